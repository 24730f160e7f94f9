"""Checks that one training step's losses and gradients are finite."""

from __future__ import annotations

import math

import torch

from training.losses import LossTerms
from training.model import NoPropNet


def nonfinite_losses(terms: LossTerms) -> list[str]:
    """Name each NaN or infinite part of a batch's loss, with its value."""
    if math.isfinite(terms.total.item()):
        return []  # the sum is finite only when every part is
    parts = []
    block_values = zip(terms.block_loss.tolist(), terms.block_mse.tolist(), strict=True)
    for t, (loss, mse) in enumerate(block_values, start=1):
        if not (math.isfinite(loss) and math.isfinite(mse)):
            parts.append(f"block {t} denoising loss {loss} (mse {mse})")
    for name, value in (("cross-entropy", terms.cross_entropy), ("KL", terms.kl)):
        if not math.isfinite(value.item()):
            parts.append(f"{name} {value.item()}")
    return parts or [f"total {terms.total.item()}"]


def nonfinite_gradients(model: NoPropNet) -> list[str]:
    """Name each part of the model whose gradients contain NaN or infinity.

    The check uses the max-norm of each part's gradients, which is NaN or
    infinite exactly when an element is, and unlike the L2 norm never overflows.
    """
    groups: dict[str, list[torch.Tensor]] = {}
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            groups.setdefault(part_name(name), []).append(parameter.grad)
    if not groups:
        return []
    norms = [
        torch.nn.utils.get_total_norm(grads, norm_type=math.inf)
        for grads in groups.values()
    ]
    return [
        f"{part} (max |gradient| {norm})"
        for part, norm in zip(groups, torch.stack(norms).tolist(), strict=True)
        if not math.isfinite(norm)
    ]


def part_name(parameter_name: str) -> str:
    """Map a parameter name such as ``blocks.1.head.6.weight`` to ``block 2``."""
    first, _, rest = parameter_name.partition(".")
    if first == "blocks":
        return f"block {int(rest.split('.')[0]) + 1}"
    if first == "embedding":
        return "label embedding"
    return first
