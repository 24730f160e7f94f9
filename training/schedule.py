"""Noise schedule of NoProp-DT and the coefficients of its denoising steps.

NoProp indexes time opposite to DDPM: z_0 is pure noise and z_T is (almost) the
clean label embedding, so ``alpha_bar`` increases with t and
``q(z_t | y) = N(sqrt(alpha_bar_t) u_y, (1 - alpha_bar_t) I)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The cosine schedule ends at alpha_bar_T = 0.99985 for T = 10, an SNR of about
# 6,450, which makes the last block's loss weight SNR(T) - SNR(T-1) 250 times
# the next largest, so the loss would be that block alone. Capping alpha_bar at
# 0.99 (SNR 99) keeps the largest weight within 3x of the next one.
ALPHA_BAR_MAX = 0.99

# Offset of the cosine schedule (Nichol and Dhariwal, 2021) that keeps the
# first steps from being too small.
COSINE_OFFSET = 0.008


def cosine_alpha_bar(num_steps: int, max_value: float = ALPHA_BAR_MAX) -> torch.Tensor:
    """Return alpha_bar_0 .. alpha_bar_T, increasing from 0 to ``max_value``.

    The values are cos^2 of the DDPM cosine schedule read backwards, in float64.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if not 0.0 < max_value < 1.0:
        raise ValueError(f"max_value must lie in (0, 1), got {max_value}")
    s = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    angle = (1.0 - s + COSINE_OFFSET) / (1.0 + COSINE_OFFSET) * (math.pi / 2)
    alpha_bar = torch.cos(angle) ** 2
    alpha_bar[0] = 0.0  # cos(pi / 2)^2 is 3.7e-33 in float64, exactly 0 in theory
    return alpha_bar.clamp(max=max_value)


@dataclass(frozen=True)
class DenoisingSchedule:
    """alpha_bar_t for t = 0..T and everything derived from it, in float64."""

    alpha_bar: torch.Tensor  # (T + 1,)

    @classmethod
    def cosine(cls, num_steps: int) -> DenoisingSchedule:
        return cls(cosine_alpha_bar(num_steps))

    @property
    def num_steps(self) -> int:
        return self.alpha_bar.numel() - 1

    @property
    def snr(self) -> torch.Tensor:
        """SNR(t) = alpha_bar_t / (1 - alpha_bar_t), for t = 0..T."""
        return self.alpha_bar / (1.0 - self.alpha_bar)

    @property
    def snr_delta(self) -> torch.Tensor:
        """SNR(t) - SNR(t - 1) for t = 1..T: the weight of block t's loss."""
        snr = self.snr
        return snr[1:] - snr[:-1]

    @property
    def alpha(self) -> torch.Tensor:
        """alpha_{t-1} = alpha_bar_{t-1} / alpha_bar_t for t = 1..T."""
        return self.alpha_bar[:-1] / self.alpha_bar[1:]

    def step_coefficients(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (a, b, c), each (T,): z_t = a_t u_hat + b_t z_{t-1} + sqrt(c_t) eps.

        These are the mean and variance of q(z_t | z_{t-1}, y) with u_hat in
        place of u_y, so a chain of exact predictions reproduces q(z_t | y).
        """
        alpha_bar_prev = self.alpha_bar[:-1]
        alpha_bar_t = self.alpha_bar[1:]
        alpha = self.alpha
        a = alpha_bar_t.sqrt() * (1.0 - alpha) / (1.0 - alpha_bar_prev)
        b = alpha.sqrt() * (1.0 - alpha_bar_t) / (1.0 - alpha_bar_prev)
        c = (1.0 - alpha_bar_t) * (1.0 - alpha) / (1.0 - alpha_bar_prev)
        return a, b, c
