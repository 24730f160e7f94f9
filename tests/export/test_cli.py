"""python -m export: help, exit codes and messages, and a learned-embedding export."""

from __future__ import annotations

import subprocess
import sys

import onnx
import pytest
import torch

from export import read_metadata
from export.cli import EXIT_INVALID_INPUT, EXIT_VERIFICATION_FAILED, build_parser, main


def test_help_gives_meaning_and_defaults():
    text = build_parser().format_help()

    assert "verify on the first N test images (default: 0, the whole test split)" in (
        " ".join(text.split())
    )
    assert "(default: 18)" in text
    assert "(default: 256)" in text
    assert "$NOPROP_DATA_ROOT" in text
    assert "--fp16" in text
    assert "--int8" in text
    assert "Exit status" in text


def test_missing_checkpoint_exits_with_path(tmp_path, capsys):
    missing = tmp_path / "missing.pt"

    code = main([str(missing), "-o", str(tmp_path / "model.onnx")])

    assert code == EXIT_INVALID_INPUT
    assert f"checkpoint {missing} not found" in capsys.readouterr().err
    assert not (tmp_path / "model.onnx").exists()


def test_truncated_checkpoint_exits_with_path(tiny_mnist_checkpoint, tmp_path, capsys):
    truncated = tmp_path / "truncated.pt"
    data = tiny_mnist_checkpoint.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])

    code = main([str(truncated), "-o", str(tmp_path / "model.onnx")])

    err = capsys.readouterr().err
    assert code == EXIT_INVALID_INPUT
    assert f"checkpoint {truncated} is truncated or corrupt" in err
    assert not (tmp_path / "model.onnx").exists()


def test_foreign_checkpoint_exits_with_path(tmp_path, capsys):
    foreign = tmp_path / "resnet.pt"
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, foreign)

    code = main([str(foreign), "-o", str(tmp_path / "model.onnx")])

    assert code == EXIT_INVALID_INPUT
    assert f"{foreign} is not a NoProp checkpoint" in capsys.readouterr().err


def test_missing_data_root_exits_with_hint(
    tiny_mnist_checkpoint, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("NOPROP_DATA_ROOT")

    code = main([str(tiny_mnist_checkpoint), "-o", str(tmp_path / "model.onnx")])

    assert code == EXIT_INVALID_INPUT
    assert "pass --data-root DIR or set NOPROP_DATA_ROOT" in capsys.readouterr().err


@pytest.mark.usefixtures("reuse_exported_graph", "strict_fp32_bound")
def test_failed_verification_exits_with_numbers(
    tiny_mnist_checkpoint, data_root, tmp_path, capsys
):
    output = tmp_path / "model.onnx"
    args = ["--data-root", str(data_root), "--verify-images", "32"]

    code = main([str(tiny_mnist_checkpoint), "-o", str(output), *args])

    err = capsys.readouterr().err
    assert code == EXIT_VERIFICATION_FAILED
    assert "max absolute difference of probabilities" in err
    assert "is not below 0" in err
    assert f"not written: {output}" in err
    assert not output.exists()


def test_module_entry_point_exits_nonzero(tmp_path):
    missing = tmp_path / "missing.pt"

    result = subprocess.run(
        [sys.executable, "-m", "export", str(missing)],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == EXIT_INVALID_INPUT
    assert str(missing) in result.stderr


def test_cli_exports_learned_embedding(learned_checkpoint, data_root, tmp_path, capsys):
    output = tmp_path / "learned.onnx"
    args = ["--data-root", str(data_root), "--verify-images", "64"]

    code = main([str(learned_checkpoint), "-o", str(output), *args])

    assert code == 0
    assert f"fp32: {output}" in capsys.readouterr().out
    metadata = read_metadata(onnx.load(output))
    assert metadata.label_embedding == "learned"
    assert metadata.num_steps == 2
    assert metadata.test_images == 64
