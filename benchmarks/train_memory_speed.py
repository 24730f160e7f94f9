"""Compare NoProp-DT with back-propagation: training speed and peak memory.

Three methods train the same blocks on the same real images, with the same
batch size, in one run of this script: NoProp-DT block by block ("dt"),
NoProp-DT with every block's loss in one batched torch.func call
("dt-batched", training/batched.py) and back-propagation ("backprop"). Both
NoProp-DT methods add the classifier's cross-entropy and the KL term. Each
method runs in a fresh child process so that its peak memory is its own:

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
from training.losses import BlockShare, loss_and_gradients
from training.model import ModelConfig, NoPropNet
from training.trainer import resolve_device

METHODS = ("dt", "dt-batched", "backprop")
METHOD_NAMES = {
    "dt": "NoProp-DT, block loop",
    "dt-batched": "NoProp-DT, batched blocks",
    "backprop": "back-propagation",
}


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
    variant = "dt" if args.method == "dt-batched" else args.method
    config = ModelConfig(info.image_shape, len(info.class_names), variant=variant)
    model = NoPropNet(config).to(device).train()
    share = BlockShare.whole(model.num_blocks)
    if args.method == "dt-batched":
        share = BlockShare(share.blocks, batched=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-3)
    order = torch.randperm(len(split))
    batches = order[: (args.steps + args.warmup) * args.batch_size].split(
        args.batch_size
    )

    def train_step(index: torch.Tensor) -> None:
        x = normalize(split.images[index].to(device), info)
        labels = split.labels[index].to(device)
        optimizer.zero_grad(set_to_none=True)
        loss_and_gradients(model, x, labels, share=share)
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline_rss = current_rss_bytes()
    for index in batches[: args.warmup]:
        train_step(index)

    start, cpu_start = time.perf_counter(), time.process_time()
    for index in batches[args.warmup :]:
        train_step(index)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_bytes() - baseline_rss
    return {
        "method": args.method,
        "images_per_second": args.steps * args.batch_size / seconds,
        "seconds_per_step": seconds / args.steps,
        # CPU time of all this process's threads: less sensitive than wall time
        # to other processes that share the CPUs.
        "cpu_seconds_per_step": cpu_seconds / args.steps,
        "peak_memory_bytes": peak,
        "seconds": seconds,
        # Runnable threads on the machine, averaged over the last minute: above
        # the core count, other processes were slowing this one down.
        "load_average": os.getloadavg()[0],
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


def divide_results(
    results: dict[str, dict], key: str, numerator: str, denominator: str
) -> float:
    return results[numerator][key] / results[denominator][key]


def report(results: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [
        f"machine: {describe_machine()}, device {args.device}",
        f"data: {args.dataset}, batch {args.batch_size}, {args.steps} timed steps "
        f"after {args.warmup} warm-up steps, T = 10 blocks",
        "",
        "| method | images/s | ms per step | CPU ms per step | peak memory (MiB) "
        "| load average (1 min) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for method in METHODS:
        result = results[method]
        lines.append(
            f"| {METHOD_NAMES[method]} | {result['images_per_second']:.1f} | "
            f"{result['seconds_per_step'] * 1000:.0f} | "
            f"{result['cpu_seconds_per_step'] * 1000:.0f} | "
            f"{result['peak_memory_bytes'] / 2**20:.0f} | "
            f"{result['load_average']:.1f} |"
        )
    seconds, cpu, memory = (
        "seconds_per_step",
        "cpu_seconds_per_step",
        "peak_memory_bytes",
    )
    lines += [
        "",
        "time per step, NoProp-DT loop / backprop: "
        f"{divide_results(results, seconds, 'dt', 'backprop'):.2f}x",
        "peak memory, NoProp-DT loop / backprop: "
        f"{divide_results(results, memory, 'dt', 'backprop'):.2f}x (target < 1x)",
        "time per step, NoProp-DT batched / loop: "
        f"{divide_results(results, seconds, 'dt-batched', 'dt'):.2f}x",
        "CPU time per step, NoProp-DT batched / loop: "
        f"{divide_results(results, cpu, 'dt-batched', 'dt'):.2f}x",
        "peak memory, NoProp-DT batched / loop: "
        f"{divide_results(results, memory, 'dt-batched', 'dt'):.2f}x",
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
