"""NoProp-DT block losses for several blocks at once, as one batched computation.

The loop in training/losses.py runs block t, back-propagates its loss and moves
on to block t + 1. Here torch.func.vmap runs one template block over the
parameters and buffers of the selected blocks, stacked along a new leading axis,
so T small forward and backward passes become one pass with fewer, larger
kernels.

The price is memory. The loop keeps one block's activations alive at a time,
which is NoProp's memory saving over back-propagation. This keeps the
activations of every selected block alive until backward, plus a stacked copy
of their parameters and of its gradient.

The blocks stay ordinary modules. Their parameters are stacked with torch.stack
inside the autograd graph, so backward puts the gradients on each block's own
parameters and the optimizer, state_dict and checkpoint format do not change.
BatchNorm updates its running statistics in the stacked buffers, which are then
copied back into each block.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from training.model import DenoisingBlock, NoPropNet

# One parameterless DenoisingBlock on the meta device per model: the code that
# functional_call runs with the stacked tensors. An entry is dropped when its
# model is garbage-collected.
_TEMPLATES: weakref.WeakKeyDictionary[NoPropNet, DenoisingBlock] = (
    weakref.WeakKeyDictionary()
)

TensorDict = dict[str, torch.Tensor]


def template_block(model: NoPropNet) -> DenoisingBlock:
    """Return the model's cached meta-device block, building it on first use."""
    template = _TEMPLATES.get(model)
    if template is None:
        with torch.device("meta"):
            template = DenoisingBlock(model.config)
        _TEMPLATES[model] = template
    return template


def check_inputs(
    model: NoPropNet,
    blocks: Sequence[int],
    x: torch.Tensor,
    u_y: torch.Tensor,
    z_prev: torch.Tensor,
) -> None:
    """Raise ValueError unless the block indices and tensor shapes fit the model."""
    num_blocks = model.num_blocks
    if not blocks:
        raise ValueError("blocks is empty; expected at least one block index")
    invalid = [t for t in blocks if not 1 <= t <= num_blocks]
    if invalid:
        raise ValueError(
            f"invalid block indices {invalid}; expected values in 1..{num_blocks}"
        )
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"blocks {list(blocks)} repeats an index; expected each once")

    image_shape = tuple(model.config.image_shape)
    if x.ndim != 4 or tuple(x.shape[1:]) != image_shape:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected (B, *{image_shape})")
    batch, dim = x.shape[0], model.config.resolved_embedding_dim
    if tuple(u_y.shape) != (batch, dim):
        raise ValueError(f"u_y has shape {tuple(u_y.shape)}; expected {(batch, dim)}")
    expected = (len(blocks), batch, dim)
    if tuple(z_prev.shape) != expected:
        raise ValueError(
            f"z_prev has shape {tuple(z_prev.shape)}; expected {expected}, "
            "that is (len(blocks), B, d)"
        )


def training_mode(modules: Sequence[nn.Module]) -> bool:
    """Return the modules' shared training flag; raise if they differ."""
    modes = {module.training for module in modules}
    if len(modes) != 1:
        raise ValueError(
            "invalid mix of train and eval mode in the selected blocks; call "
            "model.train() or model.eval() before the batched call"
        )
    return modes.pop()


def stack_named(
    modules: Sequence[nn.Module],
    named: Callable[[nn.Module], Iterator[tuple[str, torch.Tensor]]],
) -> TensorDict:
    """Stack each tensor that ``named`` lists across modules, (K, *shape)."""
    per_module = [dict(named(module)) for module in modules]
    return {
        name: torch.stack([tensors[name] for tensors in per_module])
        for name in per_module[0]
    }


@torch.no_grad()
def write_back_buffers(modules: Sequence[nn.Module], stacked: TensorDict) -> None:
    """Copy row k of each stacked buffer into module k's own buffer."""
    for index, module in enumerate(modules):
        for name, buffer in module.named_buffers():
            buffer.copy_(stacked[name][index])


def batched_logits(
    model: NoPropNet, blocks: Sequence[int], x: torch.Tensor, z_prev: torch.Tensor
) -> torch.Tensor:
    """Run blocks[k] on (x, z_prev[k]) for every k in one vmap call.

    In training mode each block's BatchNorm running statistics advance as if
    it had run on its own, and dropout draws a different mask per block.
    """
    modules = [model.blocks[t - 1] for t in blocks]
    template = template_block(model)
    template.train(training_mode(modules))
    # Parameters are stacked inside the autograd graph, so backward reaches each
    # block's own. Buffers are new tensors, written back after the call.
    params = stack_named(modules, nn.Module.named_parameters)
    with torch.no_grad():
        buffers = stack_named(modules, nn.Module.named_buffers)

    def run_block(
        params: TensorDict, buffers: TensorDict, z: torch.Tensor
    ) -> torch.Tensor:
        return functional_call(template, (params, buffers), (x, z))  # (B, num_classes)

    logits = vmap(run_block, in_dims=(0, 0, 0), randomness="different")(
        params, buffers, z_prev
    )  # (K, B, num_classes)
    write_back_buffers(modules, buffers)
    return logits


def batched_denoising_mse(
    model: NoPropNet,
    blocks: Sequence[int],
    x: torch.Tensor,
    u_y: torch.Tensor,
    z_prev: torch.Tensor,
) -> torch.Tensor:
    """Return ||u_hat_t(z_prev[k], x) - u_y||^2, batch mean, for t = blocks[k].

    x is (B, C, H, W), u_y is (B, d) and z_prev is (len(blocks), B, d); the
    result is (len(blocks),). It equals block_denoising_mse of training/losses.py
    for each block given the same z_prev, and backward reaches the same
    parameters: each selected block's and a learned embedding's weight.
    """
    check_inputs(model, blocks, x, u_y, z_prev)
    logits = batched_logits(model, blocks, x, z_prev)  # (K, B, num_classes)
    u_hat = F.softmax(logits, dim=2) @ model.embedding.weight  # (K, B, d)
    return (u_hat - u_y).pow(2).sum(2).mean(1)  # (K,)
