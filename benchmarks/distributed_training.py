"""Time and memory of NoProp-DT training on 1 process and on 2 torchrun ranks.

Each layout trains the same network on the same real images for the same
steps, in one run of this script:

    python benchmarks/distributed_training.py --data-root DIR --steps 30

Layouts: one process with as many threads as cores, one process with one
thread, and two block-parallel ranks of one thread each under torchrun (gloo).
Each layout runs in fresh processes, so a peak is its own. Per rank, the peak
memory is how far the peak resident set size grew over what the process held
before its first step (data and weights), as in train_memory_speed.py. The
time per epoch is the measured time per step times the steps of a full epoch,
plus the measured end-of-epoch synchronization.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from train_memory_speed import current_rss_bytes, describe_machine, peak_rss_bytes

from training.data import load_dataset
from training.distributed import Cluster, Layout
from training.trainer import TrainConfig, Trainer

LAYOUTS = {
    "1 process, all threads": (1, 0),
    "1 process, 1 thread": (1, 1),
    "2 ranks, 1 thread each": (2, 1),
}


def measure(args: argparse.Namespace) -> dict | None:
    """Train ``args.steps`` steps as this rank; rank 0 returns all ranks' results."""
    layout = Layout.from_environment()
    cluster = Cluster.start(layout, torch.device("cpu"))
    config = TrainConfig(
        dataset=args.dataset,
        batch_size=args.batch_size,
        epochs=1,
        train_subset=(args.steps + args.warmup) * args.batch_size,
        test_subset=args.batch_size,
        train_eval_size=args.batch_size,
    )
    with tempfile.TemporaryDirectory() as output:
        trainer = Trainer(config, output, args.data_root, cluster=cluster)
        batches = trainer.epoch_batches(torch.arange(len(trainer.train_split)))
        baseline = current_rss_bytes()
        for step, index in enumerate(batches[: args.warmup]):
            trainer.run_step(index, step)

        cluster.barrier()
        start = time.perf_counter()
        for step, index in enumerate(batches[args.warmup :], start=args.warmup):
            trainer.run_step(index, step)
        cluster.barrier()
        seconds = time.perf_counter() - start

        start = time.perf_counter()
        cluster.sync_blocks(trainer.model)
        cluster.gather_optimizer_state(trainer.optimizer, trainer.owned_parameters)
        sync_seconds = time.perf_counter() - start
        shared = sum(p.numel() for p in trainer.shared_parameters)
    result = {
        "rank": layout.rank,
        "blocks": list(trainer.share.blocks),
        "seconds_per_step": seconds / args.steps,
        "sync_seconds": sync_seconds,
        "peak_memory_bytes": peak_rss_bytes() - baseline,
        "peak_rss_bytes": peak_rss_bytes(),
        "all_reduce_values_per_step": shared + layout.world_size,
        "load_average": os.getloadavg()[0],
    }
    results = [result]
    if cluster.active:
        results = [None] * layout.world_size
        dist.all_gather_object(results, result)
    cluster.stop()
    return {"ranks": results} if layout.is_main else None


def run_layout(args: argparse.Namespace, processes: int, threads: int) -> dict:
    child = [__file__, "--child", *child_arguments(args)]
    if processes > 1:
        child = ["-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", str(processes), *child]  # fmt: skip
    environment = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    if threads:
        environment["OMP_NUM_THREADS"] = str(threads)
    else:
        environment.pop("OMP_NUM_THREADS", None)
    output = subprocess.run(
        [sys.executable, *child], check=True, capture_output=True, text=True,
        env=environment,
    ).stdout  # fmt: skip
    return json.loads(output.strip().splitlines()[-1])


def child_arguments(args: argparse.Namespace) -> list[str]:
    values = [
        "--dataset", args.dataset, "--steps", str(args.steps), "--warmup",
        str(args.warmup), "--batch-size", str(args.batch_size),
    ]  # fmt: skip
    if args.data_root:
        values += ["--data-root", args.data_root]
    return values


def epoch_seconds(result: dict, steps_per_epoch: int) -> float:
    """Return the slowest rank's time for a full epoch, with the end-of-epoch sync."""
    return max(
        rank["seconds_per_step"] * steps_per_epoch + rank["sync_seconds"]
        for rank in result["ranks"]
    )


def report(results: dict[str, dict], args: argparse.Namespace) -> str:
    train, _ = load_dataset(args.dataset, args.data_root, train=True)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    lines = [
        f"machine: {describe_machine()}",
        f"data: {args.dataset}, batch {args.batch_size}, {args.steps} timed steps "
        f"after {args.warmup} warm-up steps, T = 10 blocks; an epoch is "
        f"{steps_per_epoch} steps",
        "",
        "| layout | blocks per rank | s per step | epoch (min) | end-of-epoch "
        "sync (s) | peak memory per rank (MiB) | load average (1 min) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, result in results.items():
        ranks = result["ranks"]
        memory = ", ".join(f"{r['peak_memory_bytes'] / 2**20:.0f}" for r in ranks)
        lines.append(
            f"| {name} | {', '.join(str(len(r['blocks'])) for r in ranks)} | "
            f"{max(r['seconds_per_step'] for r in ranks):.2f} | "
            f"{epoch_seconds(result, steps_per_epoch) / 60:.1f} | "
            f"{max(r['sync_seconds'] for r in ranks):.2f} | "
            f"{memory} | "
            f"{max(r['load_average'] for r in ranks):.1f} |"
        )
    names = list(results)
    two = epoch_seconds(results[names[2]], steps_per_epoch)
    lines += [
        "",
        f"epoch time, 2 ranks / 1 process with all threads: "
        f"{two / epoch_seconds(results[names[0]], steps_per_epoch):.2f}x",
        f"epoch time, 2 ranks / 1 process with 1 thread: "
        f"{two / epoch_seconds(results[names[1]], steps_per_epoch):.2f}x",
        "values all-reduced per step: "
        f"{results[names[2]]['ranks'][0]['all_reduce_values_per_step']}",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        result = measure(args)
        if result is not None:
            print(json.dumps(result))
        return 0
    results = {}
    for name, (processes, threads) in LAYOUTS.items():
        results[name] = run_layout(args, processes, threads)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
    print(report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
