"""Test accuracy of NoProp-CT and NoProp-FM checkpoints against integration steps.

For each checkpoint, solver (Euler, Heun) and step count, the PyTorch model
classifies the whole test split deterministically (z_0 = 0). The recommended
setting has the fewest network evaluations among those within ``--tolerance``
percentage points of the best accuracy measured. It is the value for
training.continuous.DEFAULT_INTEGRATION. Writes steps.csv and steps.png to
``--output``.

    python benchmarks/ode_steps.py runs/ct/checkpoint.pt runs/fm/checkpoint.pt \
        --output docs/runs/ode-steps
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import torch

from training.data import load_dataset
from training.evaluation import accuracy, load_trained_model, with_integration
from training.model import SOLVERS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Measure the test accuracy of CT and FM checkpoints against "
        "the number of integration steps.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "checkpoints", type=Path, nargs="+", help="ct or fm checkpoints"
    )
    parser.add_argument(
        "--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="step counts"
    )
    parser.add_argument("--solvers", nargs="+", choices=SOLVERS, default=SOLVERS)
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.05,
        help="percentage points below the best that still count as converged",
    )
    parser.add_argument("--data-root", default=None, help="default: $NOPROP_DATA_ROOT")
    parser.add_argument("--output", type=Path, default=Path("docs/runs/ode-steps"))
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    return parser


def evaluations(solver: str, steps: int) -> int:
    """Network evaluations per image: one per Euler step, two per Heun step."""
    return steps * (2 if solver == "heun" else 1)


def measure(args: argparse.Namespace) -> list[dict]:
    rows = []
    for checkpoint in args.checkpoints:
        trained = load_trained_model(checkpoint)
        variant = trained.model.config.variant
        split, _ = load_dataset(trained.dataset.name, args.data_root, train=False)
        for solver in args.solvers:
            for steps in args.steps:
                model = with_integration(trained, steps, solver).model
                start = time.perf_counter()
                value = accuracy(model, split, trained.dataset)
                row = {
                    "checkpoint": str(checkpoint),
                    "variant": variant,
                    "solver": solver,
                    "steps": steps,
                    "evaluations": evaluations(solver, steps),
                    "test_accuracy": value,
                    "test_images": len(split),
                    "seconds": time.perf_counter() - start,
                }
                print(
                    f"{variant} {solver:5} {steps:3} steps: "
                    f"{100 * value:.2f}% ({row['seconds']:.0f} s)",
                    flush=True,
                )
                rows.append(row)
    return rows


def recommend(rows: list[dict], tolerance: float) -> dict[str, dict]:
    """Per variant, the cheapest row within ``tolerance`` pp of the best accuracy."""
    chosen = {}
    for variant in dict.fromkeys(row["variant"] for row in rows):
        own = [row for row in rows if row["variant"] == variant]
        best = max(row["test_accuracy"] for row in own)
        good = [row for row in own if 100 * (best - row["test_accuracy"]) <= tolerance]
        chosen[variant] = min(
            good, key=lambda row: (row["evaluations"], -row["test_accuracy"])
        )
    return chosen


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for key in dict.fromkeys((row["variant"], row["solver"]) for row in rows):
        own = [row for row in rows if (row["variant"], row["solver"]) == key]
        axis.plot(
            [row["evaluations"] for row in own],
            [100 * row["test_accuracy"] for row in own],
            marker="o",
            label=f"NoProp-{key[0].upper()}, {key[1]}",
        )
    axis.set_xscale("log", base=2)
    axis.set_xlabel("network evaluations per image")
    axis.set_ylabel("test accuracy (%)")
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    args = build_parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure(args)
    args.output.mkdir(parents=True, exist_ok=True)
    with open(args.output / "steps.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.output / "steps.png")

    print("\n| variant | solver | steps | evaluations | test accuracy |")
    print("| --- | --- | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['variant']} | {row['solver']} | {row['steps']} | "
            f"{row['evaluations']} | {100 * row['test_accuracy']:.2f}% |"
        )
    for variant, row in recommend(rows, args.tolerance).items():
        print(
            f"recommended for {variant}: {row['solver']}, {row['steps']} steps "
            f"({100 * row['test_accuracy']:.2f}%)"
        )
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}")


if __name__ == "__main__":
    main()
