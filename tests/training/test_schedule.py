import math

import pytest
import torch

from training.schedule import ALPHA_BAR_MAX, DenoisingSchedule, cosine_alpha_bar


def hand_alpha_bar(t: int, num_steps: int) -> float:
    angle = (1 - t / num_steps + 0.008) / 1.008 * math.pi / 2
    return math.cos(angle) ** 2


def test_cosine_alpha_bar_hand_values():
    alpha_bar = cosine_alpha_bar(10)

    assert alpha_bar[0].item() == 0.0
    assert alpha_bar[5].item() == pytest.approx(hand_alpha_bar(5, 10), abs=1e-12)
    assert alpha_bar[5].item() == pytest.approx(0.493765, abs=1e-5)
    assert alpha_bar[9].item() == pytest.approx(0.971942, abs=1e-5)


def test_cosine_alpha_bar_caps_last_step():
    alpha_bar = cosine_alpha_bar(10)

    assert hand_alpha_bar(10, 10) > 0.9998  # the uncapped value
    assert alpha_bar[10].item() == ALPHA_BAR_MAX


def test_cosine_alpha_bar_increases():
    alpha_bar = cosine_alpha_bar(10)

    assert torch.all(alpha_bar[1:] > alpha_bar[:-1])


def test_snr_delta_weights_none_dominates():
    weights = DenoisingSchedule.cosine(10).snr_delta
    largest, second = weights.sort(descending=True).values[:2]

    assert torch.all(weights > 0)
    assert largest / second < 3


def test_snr_hand_value():
    schedule = DenoisingSchedule.cosine(10)
    expected = hand_alpha_bar(5, 10) / (1 - hand_alpha_bar(5, 10))

    assert schedule.snr[5].item() == pytest.approx(expected, rel=1e-12)


def test_step_coefficients_hand_values():
    schedule = DenoisingSchedule.cosine(10)
    a, b, c = schedule.step_coefficients()
    t = 4
    alpha_bar_prev, alpha_bar_t = hand_alpha_bar(t - 1, 10), hand_alpha_bar(t, 10)
    alpha = alpha_bar_prev / alpha_bar_t

    expected_a = math.sqrt(alpha_bar_t) * (1 - alpha) / (1 - alpha_bar_prev)
    expected_b = math.sqrt(alpha) * (1 - alpha_bar_t) / (1 - alpha_bar_prev)
    expected_c = (1 - alpha_bar_t) * (1 - alpha) / (1 - alpha_bar_prev)
    assert a[t - 1].item() == pytest.approx(expected_a, rel=1e-12)
    assert b[t - 1].item() == pytest.approx(expected_b, rel=1e-12)
    assert c[t - 1].item() == pytest.approx(expected_c, rel=1e-12)


def test_step_coefficients_first_step_ignores_noise_input():
    a, b, c = DenoisingSchedule.cosine(10).step_coefficients()
    alpha_bar_1 = hand_alpha_bar(1, 10)

    assert b[0].item() == 0.0
    assert a[0].item() == pytest.approx(math.sqrt(alpha_bar_1), rel=1e-12)
    assert c[0].item() == pytest.approx(1 - alpha_bar_1, rel=1e-12)


def test_step_coefficients_preserve_marginals():
    # With u_hat = u_y and z_{t-1} ~ q(z_{t-1} | y), one step gives q(z_t | y).
    schedule = DenoisingSchedule.cosine(10)
    a, b, c = schedule.step_coefficients()
    alpha_bar_prev, alpha_bar_t = schedule.alpha_bar[:-1], schedule.alpha_bar[1:]

    mean = a + b * alpha_bar_prev.sqrt()
    variance = b**2 * (1 - alpha_bar_prev) + c
    torch.testing.assert_close(mean, alpha_bar_t.sqrt(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(variance, 1 - alpha_bar_t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("num_steps", [0, -3])
def test_cosine_alpha_bar_rejects_bad_steps(num_steps):
    with pytest.raises(
        ValueError, match=f"num_steps must be at least 1, got {num_steps}"
    ):
        cosine_alpha_bar(num_steps)
