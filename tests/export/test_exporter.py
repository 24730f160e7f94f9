"""export_checkpoint: verified files, reproducibility and failed verification."""

from __future__ import annotations

import dataclasses

import onnx
import pytest

import export.exporter
import export.verification
from export import VerificationError, export_checkpoint, variant_path
from export.verification import TOLERANCES
from tests.export.conftest import VERIFY_IMAGES


def test_export_writes_verified_fp32_file(export_report):
    fp32 = export_report.files[0]
    result = fp32.verification

    assert fp32.precision == "fp32"
    assert fp32.path.is_file()
    assert fp32.size_bytes == fp32.path.stat().st_size
    assert result.images == VERIFY_IMAGES
    assert result.max_abs_diff < 1e-4
    assert result.argmax_mismatches == 0
    assert result.accuracy_gap <= 0.0005
    assert result.max_row_sum_error < 1e-5
    assert fp32.accuracy_drop == 0.0


def test_export_report_matches_torch_accuracy(export_report):
    fp32 = export_report.files[0]

    assert export_report.test_images == VERIFY_IMAGES
    assert export_report.dataset == "mnist"
    assert export_report.torch_accuracy == fp32.verification.torch_accuracy
    assert abs(fp32.verification.accuracy - export_report.torch_accuracy) <= 0.0005
    assert "fp32" in export_report.summary()


def test_export_leaves_no_temporary_files(export_report):
    folder = export_report.files[0].path.parent

    assert sorted(path.name for path in folder.iterdir()) == [
        "model.fp16.onnx",
        "model.int8.onnx",
        "model.onnx",
    ]


def test_export_is_byte_identical_when_repeated(
    export_report, tiny_mnist_checkpoint, data_root, tmp_path
):
    first = export_report.files[0].path

    report = export_checkpoint(
        tiny_mnist_checkpoint,
        tmp_path / "again.onnx",
        data_root=data_root,
        verify_images=VERIFY_IMAGES,
    )

    assert report.files[0].path.read_bytes() == first.read_bytes()


@pytest.mark.usefixtures("reuse_exported_graph", "strict_fp32_bound")
def test_failed_verification_writes_no_file(tiny_mnist_checkpoint, data_root, tmp_path):
    output = tmp_path / "model.onnx"

    with pytest.raises(VerificationError, match="max absolute difference") as error:
        export_checkpoint(
            tiny_mnist_checkpoint, output, data_root=data_root, verify_images=32
        )

    assert "fp32 export failed verification on 32 test images" in str(error.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("reuse_exported_graph", "strict_fp32_bound")
def test_failed_verification_keeps_older_file(
    tiny_mnist_checkpoint, data_root, tmp_path
):
    output = tmp_path / "model.onnx"
    output.write_bytes(b"older model")

    with pytest.raises(VerificationError):
        export_checkpoint(
            tiny_mnist_checkpoint, output, data_root=data_root, verify_images=32
        )

    assert output.read_bytes() == b"older model"
    assert list(tmp_path.iterdir()) == [output]


@pytest.mark.usefixtures("reuse_exported_graph")
def test_failed_variant_keeps_verified_fp32(
    monkeypatch, tiny_mnist_checkpoint, data_root, tmp_path
):
    strict = dataclasses.replace(TOLERANCES["fp16"], max_abs_diff=0.0)
    monkeypatch.setitem(export.verification.TOLERANCES, "fp16", strict)
    output = tmp_path / "model.onnx"

    with pytest.raises(VerificationError, match="fp16 export failed") as error:
        export_checkpoint(
            tiny_mnist_checkpoint,
            output,
            variants=("fp16",),
            data_root=data_root,
            verify_images=32,
        )

    assert output.is_file()
    assert not variant_path(output, "fp16").exists()
    assert [file.precision for file in error.value.report.files] == ["fp32"]
    assert onnx.load(output).graph.input[0].name == "image"


def test_invalid_variant_is_rejected_first(tmp_path):
    missing = tmp_path / "missing.pt"

    with pytest.raises(export.ExportError, match="invalid variant 'bf16'"):
        export_checkpoint(missing, tmp_path / "model.onnx", variants=["bf16"])


def test_variant_path_inserts_precision(tmp_path):
    assert variant_path(tmp_path / "model.onnx", "fp16") == tmp_path / "model.fp16.onnx"
    assert variant_path(tmp_path / "model.onnx", "fp32") == tmp_path / "model.onnx"
