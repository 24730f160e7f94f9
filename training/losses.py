"""Training objectives of NoProp-DT, -CT and -FM and of the backprop baseline."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.batched import batched_denoising_mse
from training.continuous import FM_PATH_NOISE, ContinuousNoPropNet
from training.model import NoPropNet

# Weight of the denoising terms (eta in Li, Teh and Pascanu 2025, "NoProp",
# arXiv 2503.24322): 0.1 for NoProp-DT, 1 for NoProp-CT. NoProp-FM's loss has
# no such weight; eta scales its velocity term.
DEFAULT_ETAS = {"dt": 0.1, "ct": 1.0, "fm": 1.0, "backprop": 0.1}
DEFAULT_ETA = DEFAULT_ETAS["dt"]
# Weightings of NoProp-CT's denoising error over t: "uniform", the same weight
# at every t (the default), or "elbo", by SNR'(t) as in the paper (see ct_loss).
CT_WEIGHTINGS = ("uniform", "elbo")


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


@dataclass(frozen=True)
class BlockShare:
    """The part of a NoProp-DT step that one process computes.

    A single process computes every block and the head. Under block parallelism
    (training/distributed.py) each rank computes its own blocks, and one rank
    group the head. With ``step_key`` set, the noise and dropout of block t
    (t = 0 for the head) come from the global generator seeded by
    (*step_key, t), so they do not depend on which process computes the block.
    """

    blocks: tuple[int, ...]  # 1-based
    head: bool = True
    step_key: tuple[int, ...] | None = None
    # Modules that run blocks' forward passes in place of model.blocks, such as
    # DistributedDataParallel wrappers, keyed by 1-based block index.
    modules: Mapping[int, nn.Module] = field(default_factory=dict)
    batched: bool = False  # all blocks in one vmap call (training/batched.py)

    @classmethod
    def whole(cls, num_blocks: int) -> BlockShare:
        return cls(tuple(range(1, num_blocks + 1)))

    def reseed(self, t: int) -> None:
        if self.step_key is None:
            return
        key = np.random.SeedSequence([*self.step_key, t])
        torch.manual_seed(int(key.generate_state(1, np.uint64)[0]))


def block_denoising_mse(
    model: NoPropNet,
    t: int,
    x: torch.Tensor,
    u_y: torch.Tensor,
    block: nn.Module | None = None,
) -> torch.Tensor:
    """||u_hat_t(z_{t-1}, x) - u_y||^2 with z_{t-1} sampled from q, batch mean.

    z_{t-1} is data here, never the previous block's output, so this loss has
    gradients only for block t (and the learned embedding, where there is one).
    """
    z_prev = sample_z(model.alpha_bar[t - 1], u_y).detach()  # (B, d)
    u_hat = model.predict_embedding(t, x, z_prev, block)  # (B, d)
    return (u_hat - u_y).pow(2).sum(1).mean()


def block_weight(model: NoPropNet, eta: float, t: int) -> float:
    """eta / 2 * (SNR(t) - SNR(t-1)), the weight of block t's mse in the loss."""
    return 0.5 * eta * model.schedule.snr_delta[t - 1].item()


def weighted_block_loss(
    model: NoPropNet,
    t: int,
    x: torch.Tensor,
    labels: torch.Tensor,
    eta: float,
    block: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (eta / 2 * (SNR(t) - SNR(t-1)) * mse_t, mse_t) for block t.

    The NoProp-DT denoising term is (T/2) eta E_t[dSNR_t mse_t]; with every block
    trained on every batch, that is the sum over t of these per-block losses.
    """
    u_y = model.embedding(labels)  # (B, d)
    mse = block_denoising_mse(model, t, x, u_y, block)
    return block_weight(model, eta, t) * mse, mse.detach()


def head_loss(
    model: NoPropNet, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (CE of the classifier on z_T ~ q(z_T | y), KL(q(z_0 | y) || N(0, I)))."""
    u_y = model.embedding(labels)  # (B, d)
    z_last = sample_z(model.alpha_bar[model.config.num_steps], u_y)
    cross_entropy = F.cross_entropy(model.classifier(z_last), labels)
    return cross_entropy, kl_to_standard_normal(model.alpha_bar[0], u_y)


def noprop_dt_step(
    model: NoPropNet,
    x: torch.Tensor,
    labels: torch.Tensor,
    eta: float = DEFAULT_ETA,
    share: BlockShare | None = None,
) -> LossTerms:
    """Compute the NoProp-DT loss and its gradients, one block at a time.

    Each block's loss is back-propagated on its own before the next block runs,
    so only one block's activations are alive at once. That is where NoProp's
    memory saving over back-propagation comes from. ``share`` picks the blocks
    (default all, and the head); the blocks it leaves out count 0 in the terms.
    """
    share = share or BlockShare.whole(model.config.num_steps)
    weighted = x.new_zeros(model.config.num_steps)  # (T,)
    block_mse = x.new_zeros(model.config.num_steps)  # (T,)
    if share.batched:
        batched_block_losses(model, x, labels, eta, share, weighted, block_mse)
    else:
        for t in share.blocks:
            share.reseed(t)
            loss, mse = weighted_block_loss(
                model, t, x, labels, eta, share.modules.get(t)
            )
            loss.backward()
            weighted[t - 1], block_mse[t - 1] = loss.detach(), mse

    cross_entropy, kl = x.new_zeros(()), x.new_zeros(())
    if share.head:
        share.reseed(0)
        cross_entropy, kl = head_loss(model, labels)
        (cross_entropy + kl).backward()
    cross_entropy, kl = cross_entropy.detach(), kl.detach()
    total = weighted.sum() + cross_entropy + kl
    return LossTerms(total, cross_entropy, kl, block_mse, weighted)


def batched_block_losses(
    model: NoPropNet,
    x: torch.Tensor,
    labels: torch.Tensor,
    eta: float,
    share: BlockShare,
    weighted: torch.Tensor,
    block_mse: torch.Tensor,
) -> None:
    """Back-propagate the losses of ``share.blocks`` as one vmap computation.

    Fills ``weighted`` and ``block_mse`` (T,) at the blocks' positions.
    """
    u_y = model.embedding(labels)  # (B, d)
    z_prev = []
    for t in share.blocks:
        share.reseed(t)
        z_prev.append(sample_z(model.alpha_bar[t - 1], u_y).detach())
    mse = batched_denoising_mse(model, share.blocks, x, u_y, torch.stack(z_prev))
    weights = mse.new_tensor([block_weight(model, eta, t) for t in share.blocks])
    (weights * mse).sum().backward()
    index = torch.tensor(share.blocks, device=x.device) - 1
    weighted[index] = (weights * mse).detach()
    block_mse[index] = mse.detach()


def backprop_step(model: NoPropNet, x: torch.Tensor, labels: torch.Tensor) -> LossTerms:
    """Compute the chained network's cross-entropy and back-propagate it end to end."""
    cross_entropy = F.cross_entropy(model(x), labels)
    cross_entropy.backward()
    zero = cross_entropy.new_zeros(())
    block_mse = cross_entropy.new_zeros(model.config.num_steps)
    return LossTerms(
        cross_entropy.detach(), cross_entropy.detach(), zero, block_mse, block_mse
    )


def ct_loss(
    model: ContinuousNoPropNet,
    x: torch.Tensor,
    labels: torch.Tensor,
    eta: float,
    weighting: str = "uniform",
) -> LossTerms:
    """NoProp-CT: CE on z_1 + KL on z_0 + eta / 2 E_t[SNR'(t) ||u_hat - u_y||^2].

    t ~ U[0, 1], one per example. The schedule's weights get gradients through
    SNR'(t) and through z_t's noise level.

    SNR'(t) grows with SNR(t), so under "elbo" nearly all the weight falls on t
    near 1, where z_t already shows the label. The one shared network then
    learns the early steps slowly. "uniform" drops SNR'(t) from the
    denoising term and freezes the schedule, which would otherwise learn to
    make every z_t clean. On MNIST, "uniform" reached 98.56% after 2 epochs
    and "elbo" 95.98% after 3 (docs/benchmarks.md).
    """
    if weighting not in CT_WEIGHTINGS:
        raise ValueError(
            f"invalid weighting {weighting!r}; expected one of {CT_WEIGHTINGS}"
        )
    u_y = model.embedding(labels)  # (B, d)
    t = torch.rand(labels.shape[0], device=u_y.device, dtype=u_y.dtype)
    if weighting == "elbo":
        snr, snr_slope = model.noise_schedule.snr_and_derivative(t)
        alpha_bar = (snr / (1 + snr))[:, None]  # sigmoid(-gamma), (B, 1)
    else:
        with torch.no_grad():
            alpha_bar = model.noise_schedule.alpha_bar(t)[:, None]
        snr_slope = torch.ones_like(t)
    z_t = sample_z(alpha_bar, u_y.detach())
    mse = (model.predict(x, z_t, t) - u_y).pow(2).sum(1)  # (B,)
    denoising = 0.5 * eta * (snr_slope * mse).mean()

    with torch.no_grad():  # gamma_bar is 0 at t = 0 and 1 at t = 1 by construction
        ends = model.noise_schedule.alpha_bar(t.new_tensor([0.0, 1.0]))
    cross_entropy = F.cross_entropy(model.classifier(sample_z(ends[1], u_y)), labels)
    kl = kl_to_standard_normal(ends[0], u_y)
    total = denoising + cross_entropy + kl
    return LossTerms(
        total,
        cross_entropy,
        kl,
        mse.mean().detach()[None],
        denoising.detach()[None],
    )


def fm_loss(
    model: ContinuousNoPropNet, x: torch.Tensor, labels: torch.Tensor, eta: float
) -> LossTerms:
    """NoProp-FM: eta ||v_hat(z_t, x, t) - (u_y - z_0)||^2 on z_t = t u_y + (1 - t) z_0.

    A learned or prototype embedding adds the cross-entropy of the extrapolated
    z_1 = z_t + (1 - t) v_hat against the class embeddings, which keeps the
    embeddings from collapsing onto each other.
    """
    u_y = model.embedding(labels)  # (B, d)
    t = torch.rand(labels.shape[0], 1, device=u_y.device, dtype=u_y.dtype)
    z_0 = torch.randn_like(u_y)
    z_t = t * u_y + (1 - t) * z_0 + FM_PATH_NOISE * torch.randn_like(u_y)
    v_hat = model.predict(x, z_t, t[:, 0])
    mse = (v_hat - (u_y - z_0)).pow(2).sum(1).mean()
    cross_entropy = mse.new_zeros(())
    if model.config.embedding != "one-hot":
        z_1 = z_t + (1 - t) * v_hat
        cross_entropy = F.cross_entropy(model.embedding_logits(z_1), labels)
    total = eta * mse + cross_entropy
    return LossTerms(
        total,
        cross_entropy,
        mse.new_zeros(()),
        mse.detach()[None],
        (eta * mse).detach()[None],
    )


def detached(terms: LossTerms) -> LossTerms:
    return LossTerms(
        terms.total.detach(),
        terms.cross_entropy.detach(),
        terms.kl.detach(),
        terms.block_mse,
        terms.block_loss,
    )


def loss_and_gradients(
    model: NoPropNet | ContinuousNoPropNet,
    x: torch.Tensor,
    labels: torch.Tensor,
    eta: float = DEFAULT_ETA,
    ct_weighting: str = "uniform",
    share: BlockShare | None = None,
) -> LossTerms:
    """Compute the variant's loss on one batch and accumulate its gradients.

    CT and FM train one network, so their loss is back-propagated whole.
    ``share`` applies to NoProp-DT (see noprop_dt_step).
    """
    variant = model.config.variant
    if variant == "backprop":
        return backprop_step(model, x, labels)
    if variant in ("ct", "fm"):
        if variant == "ct":
            terms = ct_loss(model, x, labels, eta, ct_weighting)
        else:
            terms = fm_loss(model, x, labels, eta)
        terms.total.backward()
        return detached(terms)
    return noprop_dt_step(model, x, labels, eta, share)
