"""Checkpoints and models are never unpickled: not by training, export or the service.

A pickle can name any callable, so loading one runs code. The payload here makes
a directory when it is unpickled, and every loader must reject the file without
making it.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

from export.cli import EXIT_INVALID_INPUT
from export.cli import main as export_main
from export.exporter import export_checkpoint
from service.model import ModelError, ModelSession
from training.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint
from training.cli import main as train_main
from training.evaluation import load_trained_model
from training.trainer import Trainer

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
PRODUCT_PACKAGES = ("training", "export", "service", "loadtest")


class MakeDirectoryWhenUnpickled:
    """An object whose unpickling calls ``os.mkdir(marker)``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.fixture
def trap(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint-shaped torch file with the payload, and the payload's marker."""
    marker = tmp_path / "payload-ran"
    path = tmp_path / "run" / "checkpoint.pt"
    path.parent.mkdir()
    payload = MakeDirectoryWhenUnpickled(marker)
    contents = {
        "format": CHECKPOINT_FORMAT,
        "version": 1,
        "model_config": {},
        "dataset": {},
        "model_state": {"weight": payload},
    }
    torch.save(contents, path)
    return path, marker


def test_trap_runs_when_unpickled(trap):
    path, marker = trap

    torch.load(path, weights_only=False)

    assert marker.is_dir()


def test_load_checkpoint_rejects_pickled_payload(trap):
    path, marker = trap

    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(path)

    assert not marker.exists()


def test_trainer_resume_rejects_pickled_payload(trap):
    path, marker = trap

    with pytest.raises(CheckpointError, match="is not a NoProp checkpoint"):
        Trainer.from_checkpoint(path)

    assert not marker.exists()


def test_training_command_rejects_pickled_payload(trap, capsys):
    path, marker = trap

    assert train_main(["--resume", str(path)]) == 2

    assert "is not a NoProp checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_exporter_rejects_pickled_payload(trap, tmp_path):
    path, marker = trap
    output = tmp_path / "model.onnx"

    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_trained_model(path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        export_checkpoint(path, output)

    assert not marker.exists()
    assert not output.exists()


def test_export_command_rejects_pickled_payload(trap, tmp_path, capsys):
    path, marker = trap

    code = export_main([str(path), "-o", str(tmp_path / "model.onnx")])

    assert code == EXIT_INVALID_INPUT
    assert "is not a NoProp checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_service_rejects_pickled_model_file(trap, tmp_path):
    path, marker = trap
    model_file = tmp_path / "model.onnx"
    model_file.write_bytes(path.read_bytes())

    with pytest.raises(ModelError, match="onnxruntime cannot load"):
        ModelSession(model_file, "noprop", ["CPUExecutionProvider"])

    assert not marker.exists()


# --- source scan ---

UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "joblib", "shelve"}


def unpickling_calls(source: str, filename: str) -> list[str]:
    """List the lines of ``source`` that import a pickle module or unpickle a file.

    Flagged: imports of ``UNPICKLING_MODULES``, ``torch.load`` without
    ``weights_only=True``, ``numpy.load`` with ``allow_pickle=True`` and
    ``pandas.read_pickle``.
    """
    findings = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [alias.name for alias in node.names]
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                if name.split(".")[0] in UNPICKLING_MODULES:
                    findings.append(f"{where} imports {name}")
        if not isinstance(node, ast.Call):
            continue
        called = ast.unparse(node.func)
        keywords = {kw.arg: ast.unparse(kw.value) for kw in node.keywords}
        if called.endswith("torch.load") and keywords.get("weights_only") != "True":
            findings.append(f"{where} calls {called} without weights_only=True")
        numpy_load = called in ("np.load", "numpy.load")
        if numpy_load and keywords.get("allow_pickle", "False") != "False":
            findings.append(f"{where} calls {called} with allow_pickle")
        if called.endswith("read_pickle"):
            findings.append(f"{where} calls {called}")
    return findings


@pytest.mark.parametrize(
    "source",
    [
        "import pickle",
        "from joblib import load",
        "torch.load(path)",
        "torch.load(path, weights_only=False)",
        "np.load(path, allow_pickle=True)",
        "pandas.read_pickle(path)",
    ],
)
def test_scan_flags_unpickling(source):
    assert unpickling_calls(source, "example.py")


@pytest.mark.parametrize(
    "source",
    ["torch.load(path, weights_only=True)", "np.load(path)", "onnx.load(path)"],
)
def test_scan_passes_safe_loads(source):
    assert unpickling_calls(source, "example.py") == []


def test_product_code_never_unpickles():
    findings = []
    for package in PRODUCT_PACKAGES:
        for path in sorted((REPOSITORY_ROOT / package).rglob("*.py")):
            relative = str(path.relative_to(REPOSITORY_ROOT))
            findings += unpickling_calls(path.read_text(), relative)

    assert findings == []
