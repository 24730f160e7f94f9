"""Block-parallel and data-parallel NoProp-DT training with torch.distributed.

NoProp-DT's blocks do not need each other while training: block t learns from
a noised label, not from block t-1's output. So ranks can own disjoint sets of
blocks and train them on the same minibatches. Launch with torchrun, one rank
per process (and per GPU):

    torchrun --nproc-per-node 2 -m training --block-groups 2 ...

The world is split into ``block_groups`` groups of ``data_parallel`` ranks
each. Rank r is in block group r // data_parallel and has data rank
r % data_parallel. A block group owns a contiguous run of blocks and their
optimizer state. Within a group, DistributedDataParallel averages the owned
blocks' gradients over the data ranks, each of which takes its own slice of
every minibatch. The shared parts, the classifier and a learned label
embedding, get their gradients summed over all ranks in one all-reduce per
step, so every rank applies the same update and they stay identical.

At the end of each epoch every owner broadcasts its blocks, so each rank holds
the whole network; rank 0 gathers the optimizer state, evaluates and writes the
same single-file checkpoint as a one-process run.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)

# How long a rank waits in a collective for the others: long enough for rank 0
# to evaluate and write a checkpoint while the rest wait.
# NOTE: a rank that hangs without dying (stopped, or stuck on I/O) keeps the
# others waiting this long before they fail, because torchrun notices only
# dead ranks.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


class DistributedError(Exception):
    """The requested layout of ranks does not fit the run."""


@dataclass(frozen=True)
class Layout:
    """The position of this process among the ranks of a run."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    block_groups: int = 1

    def __post_init__(self) -> None:
        if self.world_size == 1 and self.block_groups > 1:
            raise DistributedError(
                f"--block-groups {self.block_groups} needs as many ranks or more, "
                "but this process runs alone; start it with torchrun "
                f"--nproc-per-node {self.block_groups} -m training ..."
            )
        if self.block_groups < 1 or self.world_size % self.block_groups:
            divisors = [
                n for n in range(1, self.world_size + 1) if self.world_size % n == 0
            ]
            raise DistributedError(
                f"--block-groups {self.block_groups} must divide the number of "
                f"ranks, {self.world_size}; accepted: {divisors}"
            )

    @classmethod
    def from_environment(cls, block_groups: int = 0) -> Layout:
        """Read torchrun's RANK, WORLD_SIZE and LOCAL_RANK.

        ``block_groups`` 0 gives every rank its own blocks (no data parallelism).
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(
            world_size=world_size,
            rank=int(os.environ.get("RANK", "0")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            block_groups=block_groups or world_size,
        )

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.block_groups

    @property
    def block_group(self) -> int:
        return self.rank // self.data_parallel

    @property
    def data_rank(self) -> int:
        return self.rank % self.data_parallel

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def group_blocks(self, group: int, num_blocks: int) -> tuple[int, ...]:
        """Return the 1-based blocks of block group ``group``, a contiguous run."""
        if num_blocks < self.block_groups:
            raise DistributedError(
                f"{self.block_groups} block groups (--block-groups, by default one "
                f"per rank) need at least as many blocks, but the model has "
                f"{num_blocks}; lower --block-groups or raise --steps"
            )
        start = group * num_blocks // self.block_groups
        stop = (group + 1) * num_blocks // self.block_groups
        return tuple(range(start + 1, stop + 1))

    def owned_blocks(self, num_blocks: int) -> tuple[int, ...]:
        return self.group_blocks(self.block_group, num_blocks)

    def owner(self, t: int, num_blocks: int) -> int:
        """Return the rank that broadcasts block t: data rank 0 of its block group."""
        for group in range(self.block_groups):
            if t in self.group_blocks(group, num_blocks):
                return group * self.data_parallel
        raise DistributedError(f"block {t} is outside 1..{num_blocks}")


class Cluster:
    """The process group of a run, or a stand-in whose collectives do nothing."""

    def __init__(self, layout: Layout, device: torch.device | None = None) -> None:
        self.layout = layout
        # Where collectives put their tensors: NCCL reduces only CUDA tensors.
        self.device = device or torch.device("cpu")
        self.data_group: dist.ProcessGroup | None = None

    @property
    def active(self) -> bool:
        return self.layout.world_size > 1

    @classmethod
    def start(cls, layout: Layout, device: torch.device) -> Cluster:
        """Join the run's process group: gloo on CPU, NCCL on CUDA."""
        cluster = cls(layout, device)
        if not cluster.active:
            return cluster
        # NOTE: only gloo on CPU has run; the NCCL path (one rank per GPU) is
        # untested for lack of a GPU.
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
        # Every rank creates every data group, in the same order, as new_group needs.
        for group in range(layout.block_groups):
            first = group * layout.data_parallel
            ranks = list(range(first, first + layout.data_parallel))
            handle = dist.new_group(ranks)
            if group == layout.block_group:
                cluster.data_group = handle
        logger.info(
            "rank %d of %d (%s): block group %d of %d, data rank %d of %d",
            layout.rank,
            layout.world_size,
            backend,
            layout.block_group,
            layout.block_groups,
            layout.data_rank,
            layout.data_parallel,
        )
        return cluster

    def stop(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def wrap_blocks(
        self, model: nn.Module, blocks: Iterable[int], device: torch.device
    ) -> dict[int, nn.Module]:
        """Wrap each owned block in DDP over its data group (none without one)."""
        if self.layout.data_parallel == 1:
            return {}
        device_ids = [device.index] if device.type == "cuda" else None
        return {
            t: DistributedDataParallel(
                model.blocks[t - 1],
                device_ids=device_ids,
                process_group=self.data_group,
            )
            for t in blocks
        }

    def reduce_shared_gradients(
        self, parameters: list[nn.Parameter], failed: bool
    ) -> list[int]:
        """Sum the shared parameters' gradients over all ranks, averaged over data.

        Also shares each rank's ``failed`` flag (a non-finite loss or gradient)
        and returns the ranks that raised it, so that all ranks stop together.
        """
        if not self.active:
            return [0] if failed else []
        flag = torch.zeros(self.layout.world_size, device=self.device)
        flag[self.layout.rank] = float(failed)
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in parameters]
        flat = torch.cat([g.flatten() for g in grads] + [flag])
        dist.all_reduce(flat)
        offset = 0
        for parameter, grad in zip(parameters, grads, strict=True):
            size = grad.numel()
            parameter.grad = flat[offset : offset + size].view_as(grad)
            parameter.grad /= self.layout.data_parallel
            offset += size
        return flat[offset:].nonzero().flatten().tolist()

    def reduce_totals(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        """Sum per-rank epoch totals of the losses, averaged over data ranks."""
        if not totals:
            return {}
        names = list(totals)  # the same order on every rank
        values = torch.stack([torch.as_tensor(totals[n]).float() for n in names])
        if self.active:
            values = values.to(self.device)
            dist.all_reduce(values)
            values /= self.layout.data_parallel
        return dict(zip(names, values.tolist(), strict=True))

    def sync_blocks(self, model: nn.Module) -> None:
        """Copy every block's weights and statistics from its owner to all ranks."""
        if not self.active:
            return
        num_blocks = len(model.blocks)
        for t, block in enumerate(model.blocks, start=1):
            source = self.layout.owner(t, num_blocks)
            for tensor in block.state_dict().values():
                dist.broadcast(tensor, src=source)

    def gather_optimizer_state(
        self, optimizer: torch.optim.Optimizer, owned: list[nn.Parameter]
    ) -> dict | None:
        """Merge the ranks' optimizer states into one, on rank 0 (None elsewhere).

        The optimizer on every rank lists all parameters in the same order, so
        the merged state has the same indices as a one-process run's.
        """
        state = optimizer.state_dict()
        if not self.active:
            return state
        positions = {id(p): i for i, p in enumerate(all_parameters(optimizer))}
        mine = {positions[id(p)] for p in owned}
        part = {}
        if self.layout.data_rank == 0:
            part = {
                index: {key: to_cpu(value) for key, value in entry.items()}
                for index, entry in state["state"].items()
                if index in mine
            }
        parts = [None] * self.layout.world_size if self.layout.is_main else None
        dist.gather_object(part, parts, dst=0)
        if not self.layout.is_main:
            return None
        merged = {}
        for rank_part in parts:
            merged.update(rank_part)
        return {
            "state": dict(sorted(merged.items())),
            "param_groups": state["param_groups"],
        }


def all_parameters(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def to_cpu(value: object) -> object:
    return value.cpu() if isinstance(value, torch.Tensor) else value


def drop_state(optimizer: torch.optim.Optimizer, keep: list[nn.Parameter]) -> None:
    """Free the optimizer state of parameters other ranks own, after a resume."""
    kept = {id(p) for p in keep}
    for parameter in all_parameters(optimizer):
        if id(parameter) not in kept:
            optimizer.state.pop(parameter, None)
