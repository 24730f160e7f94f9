"""NoProp-CT and NoProp-FM: schedule, losses, solvers and short runs on real data."""

import math

import pytest
import torch

from training.continuous import (
    FM_PATH_NOISE,
    GAMMA_AT_0,
    GAMMA_AT_1,
    ContinuousNoPropNet,
    LearnedSchedule,
    integrate,
    time_grid,
)
from training.evaluation import (
    accuracy,
    load_trained_model,
    with_integration,
)
from training.losses import DEFAULT_ETAS, ct_loss, fm_loss, loss_and_gradients
from training.model import ModelConfig, build_model
from training.trainer import TrainConfig, Trainer, TrainingError


def make_net(variant: str, embedding: str = "one-hot", **overrides):
    config = ModelConfig(
        (1, 28, 28), 10, variant=variant, num_steps=3, embedding=embedding, **overrides
    )
    return build_model(config)


def batch(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(size, 1, 28, 28, generator=generator)
    return x, torch.randint(0, 10, (size,), generator=generator)


def randomize(schedule: LearnedSchedule, seed: int) -> LearnedSchedule:
    """Give the schedule raw weights far from its initialization, both signs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in schedule.parameters():
            parameter.copy_(3 * torch.randn(parameter.shape, generator=generator))
    return schedule


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_schedule_monotone_and_pinned(seed):
    schedule = randomize(LearnedSchedule(), seed)
    t = torch.linspace(0, 1, 2001)

    with torch.no_grad():
        gamma_bar = schedule.gamma_bar(t)
        alpha_bar = schedule.alpha_bar(t)
        snr = schedule.snr(t)

    assert gamma_bar[0].item() == pytest.approx(0, abs=1e-6)
    assert gamma_bar[-1].item() == pytest.approx(1, abs=1e-6)
    assert (gamma_bar.diff() >= 0).all()
    assert (snr > 0).all()
    assert (snr.diff() >= 0).all()
    assert ((alpha_bar > 0) & (alpha_bar < 1)).all()
    # float32: gamma_bar(0) is 0 up to rounding, so alpha_bar within 1e-4.
    assert alpha_bar[0].item() == pytest.approx(
        1 / (1 + math.exp(GAMMA_AT_0)), rel=1e-4
    )
    assert alpha_bar[-1].item() == pytest.approx(1 / (1 + math.exp(GAMMA_AT_1)))
    assert alpha_bar[-1].item() == pytest.approx(0.99)


@pytest.mark.parametrize("seed", [0, 3])
def test_snr_derivative_matches_finite_differences(seed):
    schedule = randomize(LearnedSchedule(), seed).double()
    t = torch.tensor([0.05, 0.3, 0.5, 0.77, 0.95], dtype=torch.float64)
    step = 1e-6

    snr, slope = schedule.snr_and_derivative(t)
    with torch.no_grad():
        numeric = (schedule.snr(t + step) - schedule.snr(t - step)) / (2 * step)

    torch.testing.assert_close(snr, schedule.snr(t).detach())
    torch.testing.assert_close(slope.detach(), numeric, rtol=1e-5, atol=1e-9)
    assert (slope > 0).all()


def test_ct_loss_matches_hand_computation():
    torch.manual_seed(0)
    net = make_net("ct").double().eval()  # eval: no dropout draws
    x, labels = batch()
    x = x.double()

    torch.manual_seed(1)
    terms = ct_loss(net, x, labels, eta=1.0, weighting="elbo")

    # The same draws by hand: t, then the noise of z_t, then of z_1.
    torch.manual_seed(1)
    u_y = torch.eye(10, dtype=torch.float64)[labels]
    t = torch.rand(8, dtype=torch.float64)
    with torch.no_grad():
        gamma = net.noise_schedule.gamma(t)
        step = 1e-6
        gamma_slope = (
            net.noise_schedule.gamma(t + step) - net.noise_schedule.gamma(t - step)
        ) / (2 * step)
    snr = torch.exp(-gamma)
    alpha_bar = torch.sigmoid(-gamma)[:, None]
    z_t = alpha_bar.sqrt() * u_y + (1 - alpha_bar).sqrt() * torch.randn_like(u_y)
    with torch.no_grad():
        mse = (net.predict(x, z_t, t) - u_y).pow(2).sum(1)
    denoising = 0.5 * (-gamma_slope * snr * mse).mean()
    alpha_bar_0 = 1 / (1 + math.exp(GAMMA_AT_0))
    z_1 = math.sqrt(0.99) * u_y + math.sqrt(0.01) * torch.randn_like(u_y)
    with torch.no_grad():
        cross_entropy = torch.nn.functional.cross_entropy(net.classifier(z_1), labels)
    # KL(N(sqrt(a) u, (1 - a) I) || N(0, I)) for a one-hot u: d = 10, |u|^2 = 1.
    v = 1 - alpha_bar_0
    kl = 0.5 * (alpha_bar_0 + 10 * (v - 1 - math.log(v)))

    assert terms.block_loss.item() == pytest.approx(denoising.item(), rel=1e-6)
    assert terms.block_mse.item() == pytest.approx(mse.mean().item(), rel=1e-5)
    assert terms.cross_entropy.item() == pytest.approx(cross_entropy.item(), rel=1e-5)
    assert terms.kl.item() == pytest.approx(kl, rel=1e-5)
    assert terms.total.item() == pytest.approx(
        denoising.item() + cross_entropy.item() + kl, rel=1e-6
    )


def test_ct_uniform_weighting_freezes_schedule():
    net = make_net("ct").eval()  # eval: no dropout draws
    x, labels = batch()

    torch.manual_seed(1)
    terms = loss_and_gradients(net, x, labels, eta=1.0, ct_weighting="uniform")

    assert terms.block_loss.item() == pytest.approx(0.5 * terms.block_mse.item())
    schedule_grads = [p.grad for p in net.noise_schedule.parameters()]
    assert all(grad is None for grad in schedule_grads)
    assert net.denoiser.head[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="invalid weighting 'snr'"):
        ct_loss(net, x, labels, eta=1.0, weighting="snr")


def test_fm_loss_matches_hand_computation():
    torch.manual_seed(0)
    net = make_net("fm").eval()  # eval: no dropout draws
    x, labels = batch()

    torch.manual_seed(1)
    terms = fm_loss(net, x, labels, eta=1.0)

    torch.manual_seed(1)
    u_y = torch.eye(10)[labels]
    t = torch.rand(8, 1)
    z_0 = torch.randn(8, 10)
    z_t = t * u_y + (1 - t) * z_0 + FM_PATH_NOISE * torch.randn(8, 10)
    with torch.no_grad():
        v_hat = net.denoiser(x, z_t, t[:, 0])  # one-hot: logits @ I
    mse = (v_hat - (u_y - z_0)).pow(2).sum(1).mean()

    assert terms.block_mse.item() == pytest.approx(mse.item(), rel=1e-5)
    assert terms.total.item() == pytest.approx(mse.item(), rel=1e-5)
    assert terms.cross_entropy.item() == 0  # no anchor for fixed one-hot rows


def test_fm_anchor_trains_learned_embedding():
    net = make_net("fm", "learned").train()
    x, labels = batch()

    terms = loss_and_gradients(net, x, labels, eta=1.0)

    assert terms.cross_entropy.item() > 0
    assert net.embedding.weight.grad is not None
    assert net.embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", ["ct", "fm"])
def test_one_network_gets_every_gradient(variant):
    net = make_net(variant).train()
    x, labels = batch()

    # "elbo": the CT schedule learns too. "uniform" freezes it (tested below).
    loss_and_gradients(net, x, labels, DEFAULT_ETAS[variant], ct_weighting="elbo")

    missing = [
        name
        for name, parameter in net.named_parameters()
        if parameter.grad is None or not parameter.grad.abs().sum() > 0
    ]
    assert not missing


def test_integrate_euler_and_heun_orders():
    grid = time_grid(8, torch.device("cpu")).double()
    z = torch.ones(1, 1, dtype=torch.float64)

    constant = integrate(lambda z, i: torch.full_like(z, 2.0), z, grid, "euler")
    euler = integrate(lambda z, i: z, z, grid, "euler")
    heun = integrate(lambda z, i: z, z, grid, "heun")

    assert constant.item() == pytest.approx(3.0)
    # dz/dt = z from 1 gives e at t = 1; Euler's error is O(h), Heun's O(h^2).
    assert euler.item() == pytest.approx((1 + 1 / 8) ** 8)
    assert abs(heun.item() - math.e) < abs(euler.item() - math.e) / 10
    with pytest.raises(ValueError, match="invalid solver 'rk4'"):
        integrate(lambda z, i: z, z, grid, "rk4")


@pytest.mark.parametrize("variant", ["ct", "fm"])
def test_forward_is_deterministic_and_sized(variant):
    net = make_net(variant, solver="heun").eval()
    if variant == "ct":
        torch.nn.init.normal_(net.classifier.weight)  # zero at initialization
    x, _ = batch(5)

    with torch.no_grad():
        first, second = net(x), net(x)
        noisy = net(x, deterministic=False)

    assert first.shape == (5, 10)
    assert torch.equal(first, second)
    assert not torch.equal(first, noisy)


def test_with_integration_keeps_weights_and_rejects_dt(tiny_mnist_checkpoint):
    net = make_net("fm").eval()
    trained = load_trained_model(tiny_mnist_checkpoint)

    with pytest.raises(ValueError, match="variant is 'dt'"):
        with_integration(trained, steps=4)
    trained.model = net
    heun = with_integration(trained, steps=7, solver="heun").model

    assert (heun.config.num_steps, heun.config.solver) == (7, "heun")
    assert isinstance(heun, ContinuousNoPropNet)
    for name, value in net.state_dict().items():
        assert torch.equal(value, heun.state_dict()[name]), name


def test_config_rejects_unknown_solver_and_variant():
    with pytest.raises(TrainingError, match="invalid solver 'rk4'"):
        TrainConfig(solver="rk4")
    with pytest.raises(TrainingError, match="invalid variant 'vae'"):
        TrainConfig(variant="vae")
    with pytest.raises(TrainingError, match="invalid ct_weighting 'snr'"):
        TrainConfig(ct_weighting="snr")
    assert TrainConfig(variant="ct").eta == 1.0
    assert TrainConfig(variant="dt").eta == 0.1


@pytest.mark.parametrize(
    # CT learns more slowly: its early steps get little weight (see SNR'(t)).
    ("variant", "lr", "threshold"),
    [("ct", 2e-3, 0.3), ("fm", 2e-3, 0.6)],
)
def test_short_run_on_real_mnist_learns(variant, lr, threshold, data_root, tmp_path):
    config = TrainConfig(
        dataset="mnist",
        variant=variant,
        num_steps=4,
        epochs=3,
        batch_size=64,
        lr=lr,
        lr_schedule="cosine",
        train_subset=2000,
        test_subset=500,
        train_eval_size=200,
    )
    trainer = Trainer(config, tmp_path, data_root)

    row = trainer.run()

    # 500 held-out real test images; chance is 10%.
    assert row["test_accuracy"] > threshold, row
    restored = load_trained_model(trainer.checkpoint_path)
    assert restored.model.config.variant == variant
    assert accuracy(restored.model, trainer.test_split, trainer.info) == pytest.approx(
        row["test_accuracy"]
    )
    resumed = Trainer.from_checkpoint(trainer.checkpoint_path, epochs=3)
    assert resumed.epoch == 3
    assert resumed.config == config
