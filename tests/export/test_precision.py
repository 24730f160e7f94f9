"""The fp16 and int8 variants: smaller files, same contract, bounded differences."""

from __future__ import annotations

import onnx
import pytest

from export.graph import check_contract, find_forbidden_ops
from export.precision import convert_weights_to_fp16
from export.verification import TOLERANCES
from training.evaluation import load_trained_model


def exported_file(report, precision):
    (file,) = [file for file in report.files if file.precision == precision]
    return file


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_variant_keeps_contract(export_report, tiny_mnist_checkpoint, precision):
    dataset = load_trained_model(tiny_mnist_checkpoint).dataset
    model = onnx.load(exported_file(export_report, precision).path)

    check_contract(model, dataset)
    assert find_forbidden_ops(model) == []


@pytest.mark.parametrize(
    ("precision", "max_size_ratio"), [("fp16", 0.55), ("int8", 0.5)]
)
def test_variant_is_smaller(export_report, precision, max_size_ratio):
    fp32_size = exported_file(export_report, "fp32").size_bytes

    assert (
        exported_file(export_report, precision).size_bytes < max_size_ratio * fp32_size
    )


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_variant_reports_bounds_and_drop(export_report, precision):
    file = exported_file(export_report, precision)
    fp32 = exported_file(export_report, "fp32")
    bound = TOLERANCES[precision]

    assert file.verification.max_abs_diff < bound.max_abs_diff
    assert file.verification.accuracy_gap <= bound.max_accuracy_gap
    assert file.accuracy_drop == pytest.approx(
        fp32.verification.accuracy - file.verification.accuracy
    )
    assert f"{precision}: " in export_report.summary()


def test_fp16_stores_weights_as_float16(export_report):
    model = onnx.load(exported_file(export_report, "fp16").path)
    types = {
        initializer.name: initializer.data_type
        for initializer in model.graph.initializer
    }
    matrices = [init for init in model.graph.initializer if len(init.dims) >= 2]

    assert matrices
    assert all(init.data_type == onnx.TensorProto.FLOAT16 for init in matrices)
    assert onnx.TensorProto.FLOAT in types.values()  # biases stay float32


def test_fp16_conversion_leaves_source_unchanged(fp32_model):
    before = fp32_model.SerializeToString()

    converted = convert_weights_to_fp16(fp32_model)

    assert fp32_model.SerializeToString() == before
    assert sum(node.op_type == "Cast" for node in converted.graph.node) > sum(
        node.op_type == "Cast" for node in fp32_model.graph.node
    )


def test_int8_quantizes_fully_connected_layers_only(export_report):
    model = onnx.load(exported_file(export_report, "int8").path)
    types = [node.op_type for node in model.graph.node]

    assert "MatMulInteger" in types
    assert "Gemm" not in types
    assert "ConvInteger" not in types
    assert "Conv" in types
