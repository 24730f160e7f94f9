"""Training objectives: the NoProp-DT loss and the back-propagation baseline's."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.model import NoPropNet

# Weight of the denoising terms in the NoProp-DT loss (eta in Li, Teh and
# Pascanu 2025, "NoProp", arXiv 2503.24322).
DEFAULT_ETA = 0.1


@dataclass
class LossTerms:
    """The total loss of one batch and its parts, detached, for logging."""

    total: torch.Tensor
    cross_entropy: torch.Tensor
    kl: torch.Tensor
    block_mse: torch.Tensor  # (T,), unweighted ||u_hat_t - u_y||^2, batch mean
    block_loss: torch.Tensor  # (T,), eta / 2 * dSNR_t * block_mse, as in total


def sample_z(alpha_bar: torch.Tensor, u_y: torch.Tensor) -> torch.Tensor:
    """Draw z ~ q(z | y) = N(sqrt(alpha_bar) u_y, (1 - alpha_bar) I)."""
    return alpha_bar.sqrt() * u_y + (1 - alpha_bar).sqrt() * torch.randn_like(u_y)


def kl_to_standard_normal(alpha_bar: torch.Tensor, u_y: torch.Tensor) -> torch.Tensor:
    """KL(N(sqrt(alpha_bar) u_y, (1 - alpha_bar) I) || N(0, I)), batch mean."""
    dim = u_y.shape[1]
    variance = 1 - alpha_bar
    per_example = alpha_bar * u_y.pow(2).sum(1) + dim * (variance - 1 - variance.log())
    return 0.5 * per_example.mean()


def block_denoising_mse(
    model: NoPropNet, t: int, x: torch.Tensor, u_y: torch.Tensor
) -> torch.Tensor:
    """||u_hat_t(z_{t-1}, x) - u_y||^2 with z_{t-1} sampled from q, batch mean.

    z_{t-1} is data here, never the previous block's output, so this loss has
    gradients only for block t (and the learned embedding, where there is one).
    """
    z_prev = sample_z(model.alpha_bar[t - 1], u_y).detach()  # (B, d)
    u_hat = model.predict_embedding(t, x, z_prev)  # (B, d)
    return (u_hat - u_y).pow(2).sum(1).mean()


def weighted_block_loss(
    model: NoPropNet, t: int, x: torch.Tensor, labels: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (eta / 2 * (SNR(t) - SNR(t-1)) * mse_t, mse_t) for block t.

    The NoProp-DT denoising term is (T/2) eta E_t[dSNR_t mse_t]; with every block
    trained on every batch, that is the sum over t of these per-block losses.
    """
    u_y = model.embedding(labels)  # (B, d)
    mse = block_denoising_mse(model, t, x, u_y)
    weight = model.schedule.snr_delta[t - 1].item()
    return 0.5 * eta * weight * mse, mse.detach()


def head_loss(
    model: NoPropNet, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (CE of the classifier on z_T ~ q(z_T | y), KL(q(z_0 | y) || N(0, I)))."""
    u_y = model.embedding(labels)  # (B, d)
    z_last = sample_z(model.alpha_bar[model.config.num_steps], u_y)
    cross_entropy = F.cross_entropy(model.classifier(z_last), labels)
    return cross_entropy, kl_to_standard_normal(model.alpha_bar[0], u_y)


def noprop_dt_step(
    model: NoPropNet, x: torch.Tensor, labels: torch.Tensor, eta: float = DEFAULT_ETA
) -> LossTerms:
    """Compute the NoProp-DT loss and its gradients, one block at a time.

    Each block's loss is back-propagated on its own before the next block runs,
    so only one block's activations are alive at once. That is where NoProp's
    memory saving over back-propagation comes from.
    """
    weighted, block_mse = [], []
    for t in range(1, model.config.num_steps + 1):
        loss, mse = weighted_block_loss(model, t, x, labels, eta)
        loss.backward()
        weighted.append(loss.detach())
        block_mse.append(mse)
    cross_entropy, kl = head_loss(model, labels)
    (cross_entropy + kl).backward()
    block_loss = torch.stack(weighted)  # (T,)
    total = block_loss.sum() + cross_entropy.detach() + kl.detach()
    return LossTerms(
        total, cross_entropy.detach(), kl.detach(), torch.stack(block_mse), block_loss
    )


def backprop_step(model: NoPropNet, x: torch.Tensor, labels: torch.Tensor) -> LossTerms:
    """Compute the chained network's cross-entropy and back-propagate it end to end."""
    cross_entropy = F.cross_entropy(model(x), labels)
    cross_entropy.backward()
    zero = cross_entropy.new_zeros(())
    block_mse = cross_entropy.new_zeros(model.config.num_steps)
    return LossTerms(
        cross_entropy.detach(), cross_entropy.detach(), zero, block_mse, block_mse
    )


def loss_and_gradients(
    model: NoPropNet, x: torch.Tensor, labels: torch.Tensor, eta: float = DEFAULT_ETA
) -> LossTerms:
    """Compute the variant's loss on one batch and accumulate its gradients."""
    if model.config.variant == "backprop":
        return backprop_step(model, x, labels)
    return noprop_dt_step(model, x, labels, eta)
