"""Images per second of an exported model under onnxruntime vs PyTorch eager, on CPU.

Both sides run the whole inference path on uint8 images: scaling and
standardization, the T denoising steps and the softmax. PyTorch runs the
checkpoint's model in eval mode under ``torch.inference_mode``; onnxruntime
runs the ONNX file with the CPU execution provider. The two engines take turns
for ``--rounds`` rounds per batch size, so that a change in background load
hits both, and the median round is reported.

    python benchmarks/export_throughput.py CHECKPOINT [--onnx MODEL.onnx]

Without ``--onnx`` the checkpoint is exported to a temporary file first (the
graph only: no verification, no metadata). A CT or FM checkpoint runs with the
exporter's default integration steps and solver unless ``--steps`` or
``--solver`` say otherwise; pass the same values that made ``--onnx``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export.graph import build_onnx_model
from training.continuous import DEFAULT_INTEGRATION
from training.data import normalize
from training.evaluation import TrainedModel, load_trained_model, with_integration
from training.model import SOLVERS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Compare images per second of onnxruntime and PyTorch eager "
        "on CPU for a NoProp checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint.pt to measure")
    parser.add_argument(
        "--onnx",
        type=Path,
        default=None,
        help="exported model of the checkpoint (None: export to a temporary file)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="ct and fm: integration steps"
    )
    parser.add_argument(
        "--solver", choices=SOLVERS, default=None, help="ct and fm: the ODE solver"
    )
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 8, 64], help="batch sizes"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=3.0,
        help="minimum seconds of each timed round, per engine and batch size",
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="timed rounds per engine and batch size"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="intra-op threads of both engines (0: one per CPU core)",
    )
    return parser


def images_per_second(
    run: Callable[[], object], batch_size: int, seconds: float
) -> float:
    """Call ``run`` for at least ``seconds`` and return images per second."""
    run()  # warm-up
    calls = 0
    start = time.perf_counter()
    while True:
        run()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls * batch_size / elapsed


def torch_runner(trained: TrainedModel, images: torch.Tensor) -> Callable[[], object]:
    model = trained.model.eval()

    def run() -> torch.Tensor:
        with torch.inference_mode():
            logits = model(normalize(images, trained.dataset), deterministic=True)
            return torch.softmax(logits, dim=1)

    return run


def onnx_runner(session: ort.InferenceSession, images: np.ndarray):
    return lambda: session.run(None, {"image": images})


def create_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(
    trained: TrainedModel, session: ort.InferenceSession, args: argparse.Namespace
) -> list[dict]:
    channels, height, width = trained.dataset.image_shape
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch_size in args.batch_sizes:
        shape = (batch_size, channels, height, width)
        images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        nhwc = images.permute(0, 2, 3, 1).contiguous().numpy()
        runners = {
            "torch": torch_runner(trained, images),
            "onnxruntime": onnx_runner(session, nhwc),
        }
        rounds = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, run in runners.items():
                rounds[name].append(images_per_second(run, batch_size, args.seconds))
        torch_rate = statistics.median(rounds["torch"])
        onnx_rate = statistics.median(rounds["onnxruntime"])
        rows.append(
            {
                "batch": batch_size,
                "torch": torch_rate,
                "onnxruntime": onnx_rate,
                "ratio": onnx_rate / torch_rate,
            }
        )
        print(
            f"batch {batch_size}: torch {torch_rate:.1f} images/s, "
            f"onnxruntime {onnx_rate:.1f} images/s",
            file=sys.stderr,
        )
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| batch | PyTorch eager (images/s) | onnxruntime (images/s) | ratio |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['batch']} | {row['torch']:.1f} | {row['onnxruntime']:.1f} "
            f"| {row['ratio']:.2f}x |"
        )
    return "\n".join(lines)


def describe_setup(trained: TrainedModel, threads: int) -> str:
    config = trained.model.config
    return (
        f"{trained.dataset.name}, variant {config.variant}, "
        f"{config.num_steps} steps ({config.solver} for ct and fm), "
        f"{config.embedding} embedding; "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, "
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"{threads} intra-op threads"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    trained = load_trained_model(args.checkpoint)
    variant = trained.model.config.variant
    if variant in DEFAULT_INTEGRATION:
        solver, steps = DEFAULT_INTEGRATION[variant]
        trained = with_integration(trained, args.steps or steps, args.solver or solver)

    with tempfile.TemporaryDirectory(prefix="noprop-bench-") as folder:
        path = args.onnx
        if path is None:
            path = Path(folder) / "model.onnx"
            onnx.save(build_onnx_model(trained.model, trained.dataset), path)
        session = create_session(path, threads)
        load_before = os.getloadavg()[0]
        rows = measure(trained, session, args)
        load_after = os.getloadavg()[0]

    print(describe_setup(trained, threads))
    # Other processes on the machine lower both rates; the load shows how busy it was.
    print(f"1-minute load average: {load_before:.2f} before, {load_after:.2f} after")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
