import math

import pytest
import torch

from training.losses import (
    head_loss,
    kl_to_standard_normal,
    loss_and_gradients,
    weighted_block_loss,
)
from training.model import ModelConfig, NoPropNet


def make_net(embedding: str = "one-hot", variant: str = "dt") -> NoPropNet:
    config = ModelConfig(
        (1, 28, 28), 10, variant=variant, num_steps=4, embedding=embedding
    )
    return NoPropNet(config).train()


def batch(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(size, 1, 28, 28, generator=generator)
    return x, torch.randint(0, 10, (size,), generator=generator)


def parameters_with_gradient(net: NoPropNet) -> set[str]:
    return {
        name
        for name, parameter in net.named_parameters()
        if parameter.grad is not None and parameter.grad.abs().sum() > 0
    }


@pytest.mark.parametrize("embedding", ["one-hot", "learned"])
@pytest.mark.parametrize("t", [1, 2, 4])
def test_block_loss_gradients_stay_in_block(embedding, t):
    net = make_net(embedding)
    x, labels = batch()

    loss, _ = weighted_block_loss(net, t, x, labels, eta=0.1)
    loss.backward()

    touched = parameters_with_gradient(net)
    own = {name for name in touched if name.startswith(f"blocks.{t - 1}.")}
    assert own, "block t received no gradient"
    assert touched - own <= {"embedding.weight"}


def test_head_loss_gradients_skip_blocks():
    net = make_net("learned")
    _, labels = batch()

    cross_entropy, kl = head_loss(net, labels)
    (cross_entropy + kl).backward()

    touched = parameters_with_gradient(net)
    assert not any(name.startswith("blocks.") for name in touched)
    assert "classifier.weight" in touched


def test_backprop_gradients_reach_every_block():
    net = make_net(variant="backprop")
    torch.nn.init.normal_(net.classifier.weight)
    x, labels = batch()

    loss_and_gradients(net, x, labels)

    touched = parameters_with_gradient(net)
    for t in range(4):
        assert any(name.startswith(f"blocks.{t}.") for name in touched)


def test_full_step_gradient_is_sum_of_block_gradients():
    net = make_net()
    x, labels = batch()
    torch.manual_seed(1)
    loss_and_gradients(net, x, labels)
    full = {name: p.grad.clone() for name, p in net.named_parameters()}

    net.zero_grad()
    torch.manual_seed(1)
    for t in range(1, 5):
        weighted_block_loss(net, t, x, labels, eta=0.1)[0].backward()
    sum(head_loss(net, labels)).backward()

    for name, parameter in net.named_parameters():
        torch.testing.assert_close(parameter.grad, full[name], msg=name)


def test_block_loss_weight_hand_value():
    net = make_net()
    x, labels = batch()
    t = 3
    torch.manual_seed(2)
    loss, mse = weighted_block_loss(net, t, x, labels, eta=0.1)
    snr = [a / (1 - a) for a in net.alpha_bar.double().tolist()]

    expected = 0.5 * 0.1 * (snr[t] - snr[t - 1]) * mse.item()
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_kl_hand_value():
    u_y = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    alpha_bar = torch.tensor(0.36)

    # 0.5 * (alpha_bar ||u||^2 + d (1 - alpha_bar) - d - d log(1 - alpha_bar))
    per_example = [
        0.5 * (0.36 * norm + 2 * 0.64 - 2 - 2 * math.log(0.64)) for norm in (5.0, 1.0)
    ]
    expected = sum(per_example) / 2
    assert kl_to_standard_normal(alpha_bar, u_y).item() == pytest.approx(expected)


def test_kl_is_zero_for_pure_noise():
    u_y = torch.randn(4, 10)

    assert kl_to_standard_normal(torch.tensor(0.0), u_y).item() == 0.0
