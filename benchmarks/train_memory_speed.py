"""Compare NoProp-DT with back-propagation: training speed and peak memory.

Both methods train the same blocks on the same real images, with the same
batch size, in one run of this script. Each method runs in a fresh child
process so that its peak memory is its own:

    python benchmarks/train_memory_speed.py --data-root DIR --steps 40

On CPU, the peak is how far the process's peak resident set size (RSS) grew
over what it held before the first training step (data and weights). So it
counts activations, gradients and the optimizer state. On CUDA, the peak is
torch.cuda.max_memory_allocated, which also counts the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

from training.data import load_dataset, normalize
from training.losses import loss_and_gradients
from training.model import ModelConfig, NoPropNet
from training.trainer import resolve_device

METHODS = ("dt", "backprop")


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as file:
        pages = int(file.read().split()[1])
    return pages * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(args: argparse.Namespace) -> dict:
    """Train ``args.method`` for ``args.steps`` batches and return speed and memory."""
    torch.manual_seed(0)
    device = resolve_device(args.device)
    split, info = load_dataset(args.dataset, args.data_root, train=True)
    config = ModelConfig(info.image_shape, len(info.class_names), variant=args.method)
    model = NoPropNet(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-3)
    order = torch.randperm(len(split))
    batches = order[: (args.steps + args.warmup) * args.batch_size].split(
        args.batch_size
    )

    def train_step(index: torch.Tensor) -> None:
        x = normalize(split.images[index].to(device), info)
        optimizer.zero_grad(set_to_none=True)
        loss_and_gradients(model, x, split.labels[index].to(device))
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline_rss = current_rss_bytes()
    for index in batches[: args.warmup]:
        train_step(index)

    start = time.perf_counter()
    for index in batches[args.warmup :]:
        train_step(index)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_bytes() - baseline_rss
    return {
        "method": args.method,
        "images_per_second": args.steps * args.batch_size / seconds,
        "peak_memory_bytes": peak,
        "seconds": seconds,
    }


def run_child(args: argparse.Namespace, method: str) -> dict:
    command = [sys.executable, __file__, "--child", method, *child_arguments(args)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def child_arguments(args: argparse.Namespace) -> list[str]:
    values = [
        "--dataset", args.dataset, "--steps", str(args.steps), "--warmup",
        str(args.warmup), "--batch-size", str(args.batch_size), "--device", args.device,
    ]  # fmt: skip
    if args.data_root:
        values += ["--data-root", args.data_root]
    return values


def describe_machine() -> str:
    model = platform.machine()
    with open("/proc/cpuinfo") as file:
        for line in file:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def report(results: dict[str, dict], args: argparse.Namespace) -> str:
    noprop, backprop = results["dt"], results["backprop"]
    speed_ratio = noprop["images_per_second"] / backprop["images_per_second"]
    memory_ratio = noprop["peak_memory_bytes"] / backprop["peak_memory_bytes"]
    lines = [
        f"machine: {describe_machine()}, device {args.device}",
        f"data: {args.dataset}, batch {args.batch_size}, {args.steps} timed steps "
        f"after {args.warmup} warm-up steps, T = 10 blocks",
        "",
        "| method | images/s | peak memory (MiB) |",
        "| --- | --- | --- |",
    ]
    for method, name in (("dt", "NoProp-DT"), ("backprop", "back-propagation")):
        result = results[method]
        lines.append(
            f"| {name} | {result['images_per_second']:.1f} | "
            f"{result['peak_memory_bytes'] / 2**20:.0f} |"
        )
    lines += [
        "",
        f"time per epoch, NoProp-DT / backprop: {1 / speed_ratio:.2f}x",
        f"peak memory, NoProp-DT / backprop: {memory_ratio:.2f}x (target < 1x)",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="mnist", help="dataset (default: mnist)")
    parser.add_argument(
        "--data-root", default=None, help="dataset folder (default: $NOPROP_DATA_ROOT)"
    )
    parser.add_argument(
        "--steps", type=int, default=40, help="timed batches (default: 40)"
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed batches (default: 3)"
    )
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch")
    parser.add_argument(
        "--device", default="cpu", help="auto, cpu or cuda (default: cpu)"
    )
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        args.method = args.child
        print(json.dumps(measure(args)))
        return 0
    results = {method: run_child(args, method) for method in METHODS}
    print(report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
