"""Fixtures for the export tests: tiny checkpoints and their exported files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx
import pytest
import torch

import export.exporter
import export.verification
from export import ExportReport, export_checkpoint
from training.data import DatasetInfo, load_dataset

# Enough images for a meaningful accuracy comparison at test speed.
VERIFY_IMAGES = 200


@pytest.fixture(scope="session")
def export_report(
    tiny_mnist_checkpoint: Path,
    data_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> ExportReport:
    """The tiny checkpoint exported once, as fp32, fp16 and int8."""
    output = tmp_path_factory.mktemp("export") / "model.onnx"
    return export_checkpoint(
        tiny_mnist_checkpoint,
        output,
        variants=("fp16", "int8"),
        data_root=data_root,
        verify_images=VERIFY_IMAGES,
    )


@pytest.fixture(scope="session")
def fp32_path(export_report: ExportReport) -> Path:
    return export_report.files[0].path


@pytest.fixture(scope="session")
def fp32_model(fp32_path: Path) -> onnx.ModelProto:
    return onnx.load(fp32_path)


@pytest.fixture(scope="session")
def mnist_test_images(data_root: Path) -> torch.Tensor:
    """The first 64 MNIST test images, uint8 (64, 1, 28, 28)."""
    split, _ = load_dataset("mnist", data_root, train=False)
    return split.images[:64]


@pytest.fixture(scope="session")
def cifar10_test_images(data_root: Path) -> tuple[torch.Tensor, DatasetInfo]:
    """The first 16 CIFAR-10 test images, uint8 (16, 3, 32, 32), and their info."""
    split, info = load_dataset("cifar10", data_root, train=False)
    return split.images[:16], info


@pytest.fixture(scope="session")
def learned_checkpoint(data_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """A NoProp-DT checkpoint with a learned label embedding, one minibatch trained."""
    from training.trainer import TrainConfig, Trainer

    config = TrainConfig(
        dataset="mnist",
        embedding="learned",
        num_steps=2,
        epochs=1,
        batch_size=64,
        train_subset=64,
        test_subset=100,
        train_eval_size=64,
    )
    trainer = Trainer(config, tmp_path_factory.mktemp("learned"), data_root)
    trainer.run()
    return trainer.checkpoint_path


@pytest.fixture
def reuse_exported_graph(monkeypatch, fp32_model):
    """Skip the slow torch.onnx step: return the graph exported by the fixture."""
    monkeypatch.setattr(
        export.exporter, "build_onnx_model", lambda model, dataset, opset: fp32_model
    )


@pytest.fixture
def strict_fp32_bound(monkeypatch):
    """Make the fp32 bound impossible to meet: no difference at all is below 0."""
    tolerances = export.verification.TOLERANCES
    strict = dataclasses.replace(tolerances["fp32"], max_abs_diff=0.0)
    monkeypatch.setitem(export.verification.TOLERANCES, "fp32", strict)
