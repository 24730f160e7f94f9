"""Per-epoch training log (CSV) and a PNG plot of its curves."""

from __future__ import annotations

import csv
import os
from pathlib import Path

LOG_NAME = "log.csv"
PLOT_NAME = "curves.png"


class TrainingLog:
    """Rows of per-epoch metrics, rewritten to ``log.csv`` after every epoch.

    The rows also travel inside the checkpoint, so a resumed run continues the
    same log. Both files are written to a temporary name and renamed, so a
    killed run never leaves them truncated.
    """

    def __init__(self, output_dir: str | os.PathLike, num_steps: int) -> None:
        self.output_dir = Path(output_dir)
        self.num_steps = num_steps
        self.history: list[dict] = []

    @property
    def csv_path(self) -> Path:
        return self.output_dir / LOG_NAME

    @property
    def plot_path(self) -> Path:
        return self.output_dir / PLOT_NAME

    def write_csv(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        temporary = self.csv_path.with_suffix(".csv.tmp")
        with temporary.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(self.history[0]))
            writer.writeheader()
            writer.writerows(self.history)
        temporary.replace(self.csv_path)

    def plot(self) -> Path:
        """Draw per-block denoising losses and accuracies against epochs."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [row["epoch"] for row in self.history]
        figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(11, 4))
        for t in range(1, self.num_steps + 1):
            values = [row[f"block_{t}_mse"] for row in self.history]
            if any(values):
                loss_axes.plot(epochs, values, label=f"block {t}")
        loss_axes.plot(
            epochs,
            [row["cross_entropy"] for row in self.history],
            "k--",
            label="classifier CE",
        )
        loss_axes.set(
            xlabel="epoch", ylabel="loss", yscale="log", title="training losses"
        )
        loss_axes.legend(fontsize="small", ncol=2)

        for key, label in (
            ("train_accuracy", "train (deterministic)"),
            ("test_accuracy", "test (deterministic)"),
            ("test_accuracy_stochastic", "test (stochastic)"),
        ):
            accuracy_axes.plot(
                epochs, [100 * row[key] for row in self.history], label=label
            )
        accuracy_axes.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
        accuracy_axes.legend()
        accuracy_axes.grid(alpha=0.3)

        figure.tight_layout()
        temporary = self.plot_path.with_suffix(".png.tmp")
        figure.savefig(temporary, dpi=100, format="png")
        plt.close(figure)
        temporary.replace(self.plot_path)
        return self.plot_path
