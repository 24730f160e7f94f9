"""A model file that is missing, corrupt or breaks the contract stops start-up
with a clear message and a non-zero exit status, never a half-ready server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from service.cli import EXIT_INVALID_SETTINGS, EXIT_MODEL_FAILED
from service.settings import DEFAULT_MODEL_PATH
from tests.service.conftest import REPOSITORY_ROOT, free_port

START_TIMEOUT_S = 120


def _serve(model: Path, **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "NOPROP_MODEL_PATH": str(model),
        "NOPROP_PORT": str(free_port()),
        **extra_env,
    }
    return subprocess.run(
        [sys.executable, "-m", "service"],
        cwd=REPOSITORY_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
    )


def _wrong_contract_model(path: Path) -> Path:
    """A valid ONNX model whose input is float32 [batch, 10] instead of images."""
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["image"], ["probabilities"], axis=1)],
        "not-noprop",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 10])],
        [
            helper.make_tensor_value_info(
                "probabilities", TensorProto.FLOAT, ["batch", 10]
            )
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_missing_model_stops_start(tmp_path: Path) -> None:
    result = _serve(tmp_path / "absent.onnx")
    assert result.returncode == EXIT_INVALID_SETTINGS, result.stderr
    assert "NOPROP_MODEL_PATH" in result.stderr
    assert "model file not found" in result.stderr


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("random-bytes", lambda p: p.write_bytes(os.urandom(4096)), "cannot load"),
        (
            "truncated",
            lambda p: p.write_bytes(DEFAULT_MODEL_PATH.read_bytes()[:100_000]),
            "cannot load",
        ),
        ("empty", lambda p: p.write_bytes(b""), "cannot load"),
        ("wrong-contract", _wrong_contract_model, "uint8"),
    ],
)
def test_broken_model_stops_start(tmp_path: Path, name, make, message) -> None:
    path = tmp_path / f"{name}.onnx"
    make(path)
    result = _serve(path)
    assert result.returncode == EXIT_MODEL_FAILED, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: cannot serve {path}: "), last_line
    assert message in last_line, last_line
    assert "Traceback" not in result.stderr
    assert "service.state ready" not in result.stderr
