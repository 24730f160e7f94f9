"""NoProp-CT and NoProp-FM: one network of (z_t, x, t), integrated from noise.

Both variants train a single network on a time t drawn uniformly from [0, 1]
rather than T blocks, and classify by integrating an ODE from z_0 (noise, or 0
when deterministic) at t = 0 to z_1 at t = 1 with Euler or Heun steps.

- NoProp-CT predicts the label embedding u_hat(z_t, x, t) under the learned
  schedule alpha_bar(t) = sigmoid(-gamma(t)) and takes the probability-flow
  step of DDIM, z_t = sqrt(alpha_bar) (u + sigma eps). Euler in the variables
  y = z / sqrt(alpha_bar) and sigma = sqrt((1 - alpha_bar) / alpha_bar) is the
  DDIM step; Heun adds a correction there. A linear classifier reads z_1.
- NoProp-FM predicts the velocity v_hat(z_t, x, t) of the straight path
  z_t = t u_y + (1 - t) z_0 and integrates dz/dt = v_hat. The class is the
  nearest class embedding to z_1, and the probabilities are the softmax of
  minus the squared distances.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.model import SOLVERS, ImageEncoder, LabelEmbedding, ModelConfig

TIME_EMBEDDING_DIM = 64
# gamma(0) and gamma(1): alpha_bar runs from sigmoid(-7) = 0.0009 at t = 0 to
# 0.99 at t = 1, the cap NoProp-DT uses (see training/schedule.py).
GAMMA_AT_0 = 7.0
GAMMA_AT_1 = -math.log(99.0)
# Standard deviation of the noise added to the flow-matching path z_t.
FM_PATH_NOISE = 0.01
# The exporter's default (solver, steps) per variant, chosen from the accuracy
# against steps on the MNIST test set (docs/benchmarks.md, benchmarks/ode_steps.py).
DEFAULT_INTEGRATION = {"ct": ("euler", 1), "fm": ("euler", 2)}
# Hidden units of the monotone network inside the learned schedule.
SCHEDULE_HIDDEN = 1024


class SinusoidalTimeEmbedding(nn.Module):
    """t in [0, 1] -> sin and cos at 32 frequencies from 1 to 1000 -> FC256 -> ReLU."""

    def __init__(self, dim: int = TIME_EMBEDDING_DIM, out_features: int = 256) -> None:
        super().__init__()
        frequencies = torch.exp(torch.linspace(0.0, math.log(1000.0), dim // 2))
        self.register_buffer("frequencies", frequencies)
        self.project = nn.Sequential(nn.Linear(dim, out_features), nn.ReLU())

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t[:, None] * self.frequencies  # (B,) -> (B, dim / 2)
        return self.project(torch.cat([angles.sin(), angles.cos()], dim=1))


class PositiveLinear(nn.Linear):
    """A linear layer whose weights are softplus(raw) > 0, so it is increasing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.softplus(self.weight), self.bias)


class LearnedSchedule(nn.Module):
    """gamma(t) = gamma_0 + (gamma_1 - gamma_0) (1 - gamma_bar(t)), learned.

    gamma_bar is a monotone network g(t) = l1(t) + l3(sigmoid(l2(l1(t)))) with
    positive weights, normalized to gamma_bar(0) = 0 and gamma_bar(1) = 1. Here
    gamma_0 is gamma at t = 1 and gamma_1 at t = 0, so gamma falls from
    GAMMA_AT_0 to GAMMA_AT_1, and SNR(t) = exp(-gamma(t)) rises with t.
    """

    def __init__(self) -> None:
        super().__init__()
        self.l1 = PositiveLinear(1, 1)
        self.l2 = PositiveLinear(1, SCHEDULE_HIDDEN)
        # No bias: the normalization in gamma_bar would cancel it.
        self.l3 = PositiveLinear(SCHEDULE_HIDDEN, 1, bias=False)

    def monotone(self, t: torch.Tensor) -> torch.Tensor:
        h = self.l1(t[:, None])  # (B,) -> (B, 1)
        return (h + self.l3(torch.sigmoid(self.l2(h)))).squeeze(1)

    def gamma_bar(self, t: torch.Tensor) -> torch.Tensor:
        ends = self.monotone(t.new_tensor([0.0, 1.0]))
        return (self.monotone(t) - ends[0]) / (ends[1] - ends[0])

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        return GAMMA_AT_1 + (GAMMA_AT_0 - GAMMA_AT_1) * (1 - self.gamma_bar(t))

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(-self.gamma(t))

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self.gamma(t))

    def snr_and_derivative(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return SNR(t) and dSNR/dt, both differentiable in the schedule's weights."""
        t = t.detach().requires_grad_(True)
        with torch.enable_grad():
            gamma_bar = self.gamma_bar(t)
            (slope,) = torch.autograd.grad(gamma_bar.sum(), t, create_graph=True)
        snr = torch.exp(-(GAMMA_AT_1 + (GAMMA_AT_0 - GAMMA_AT_1) * (1 - gamma_bar)))
        return snr, (GAMMA_AT_0 - GAMMA_AT_1) * slope * snr


class TimeConditionedDenoiser(nn.Module):
    """The CT and FM network: (x, z_t, t) -> class logits, without batch norm.

    Image: the NoProp-DT convolutions, then FC256 -> ReLU. z: FC256 -> ReLU.
    t: SinusoidalTimeEmbedding. The three 256-vectors are concatenated and go
    through FC256 -> ReLU -> FC128 -> ReLU -> FC num_classes.
    """

    def __init__(self, image: nn.Module, embedding_dim: int, num_classes: int) -> None:
        super().__init__()
        self.image = image
        self.label = nn.Sequential(nn.Linear(embedding_dim, 256), nn.ReLU())
        self.time = SinusoidalTimeEmbedding()
        self.head = nn.Sequential(
            nn.Linear(768, 256),
            nn.ReLU(),
            nn.Linear(256, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(
        self, x: torch.Tensor, z: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        features = torch.cat([self.image(x), self.label(z), self.time(t)], dim=1)
        return self.head(features)  # (B, 768) -> (B, num_classes)


def time_grid(num_steps: int, device: torch.device | None = None) -> torch.Tensor:
    """t_0 = 0 < t_1 < ... < t_N = 1, evenly spaced."""
    return torch.linspace(0.0, 1.0, num_steps + 1, device=device)


def full_like_batch(z: torch.Tensor, value: torch.Tensor | float) -> torch.Tensor:
    """Return a (B,) tensor of ``value``, one time per example."""
    return z.new_ones(z.shape[0]) * value


def integrate(
    velocity, z: torch.Tensor, grid: torch.Tensor, solver: str
) -> torch.Tensor:
    """Integrate dz/dt = velocity(z, t) over ``grid`` with Euler or Heun steps.

    ``velocity`` takes z (B, d) and a step index i and returns dz/dt at t_i.
    The loop runs in Python, so torch.onnx unrolls it into the graph.
    """
    if solver not in SOLVERS:
        raise ValueError(f"invalid solver {solver!r}; expected one of {SOLVERS}")
    for i in range(grid.numel() - 1):
        h = grid[i + 1] - grid[i]
        slope = velocity(z, i)
        z_euler = z + h * slope
        if solver == "euler":
            z = z_euler
        else:
            z = z + 0.5 * h * (slope + velocity(z_euler, i + 1))
    return z


class ContinuousNoPropNet(nn.Module):
    """NoProp-CT or NoProp-FM: the time-conditioned network and its ODE solver.

    ``forward`` runs inference with ``config.num_steps`` steps of
    ``config.solver`` and returns class logits, like NoPropNet.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not config.continuous:
            raise ValueError(f"variant {config.variant!r} is not ct or fm")
        self.config = config
        dim = config.resolved_embedding_dim
        image = ImageEncoder(config.image_shape, config.dropout, batch_norm=False)
        self.denoiser = TimeConditionedDenoiser(image, dim, config.num_classes)
        self.embedding = LabelEmbedding(config)
        if config.variant == "ct":
            self.noise_schedule = LearnedSchedule()
            self.classifier = nn.Linear(dim, config.num_classes)
            # Zero weights, as in NoPropNet (see the NOTE there).
            nn.init.zeros_(self.classifier.weight)
            nn.init.zeros_(self.classifier.bias)

    @property
    def num_blocks(self) -> int:
        return 1

    def schedule_record(self) -> dict:
        """Return alpha_bar(t) on the inference grid (CT) as plain lists."""
        if self.config.variant != "ct":
            return {}
        grid = time_grid(self.config.num_steps, self.embedding.weight.device)
        with torch.no_grad():
            alpha_bar = self.noise_schedule.alpha_bar(grid)
        return {"t": grid.tolist(), "alpha_bar": alpha_bar.tolist()}

    def predict(
        self, x: torch.Tensor, z: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """CT: u_hat = softmax(logits) @ W_embed. FM: v_hat = logits @ W_embed."""
        logits = self.denoiser(x, z, t)  # (B, num_classes)
        if self.config.variant == "ct":
            logits = F.softmax(logits, dim=1)
        return logits @ self.embedding.weight  # (B, d)

    def embedding_logits(self, z: torch.Tensor) -> torch.Tensor:
        """-||z - w_c||^2 for each class c, up to a per-row constant: (B, classes)."""
        weight = self.embedding.weight
        return 2 * z @ weight.T - weight.pow(2).sum(1)

    def initial_z(self, x: torch.Tensor, deterministic: bool) -> torch.Tensor:
        shape = (x.shape[0], self.config.resolved_embedding_dim)
        if deterministic:
            return x.new_zeros(shape)
        return torch.randn(shape, device=x.device, dtype=x.dtype)

    def forward(self, x: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        """Return class logits (B, num_classes) for normalized images (B, C, H, W).

        deterministic=True starts from z_0 = 0, False from z_0 ~ N(0, I). The
        ODE itself has no noise either way.
        """
        z = self.initial_z(x, deterministic)
        grid = time_grid(self.config.num_steps, x.device)
        solver = self.config.solver
        if self.config.variant == "fm":
            z = integrate(
                lambda z, i: self.predict(x, z, full_like_batch(z, grid[i])),
                z,
                grid,
                solver,
            )
            return self.embedding_logits(z)

        alpha_bar = self.noise_schedule.alpha_bar(grid)
        scale = alpha_bar.sqrt()
        sigma = ((1 - alpha_bar) / alpha_bar).sqrt()

        def velocity(y: torch.Tensor, i: int) -> torch.Tensor:
            u_hat = self.predict(x, scale[i] * y, full_like_batch(y, grid[i]))
            return (y - u_hat) / sigma[i]

        y = integrate(velocity, z / scale[0], sigma, solver)
        return self.classifier(scale[-1] * y)
