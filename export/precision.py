"""Smaller variants of an exported fp32 model: fp16 weights and int8 weights.

Both keep the uint8 input and the float32 output of the fp32 graph.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from export.errors import ExportError

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")

# With Conv quantized too (ConvInteger), a 10-step MNIST model ran 2 to 4 times
# slower than in fp32 under onnxruntime 1.32 on a 2-core AVX2 machine, so only
# the fully connected layers are quantized. They hold about 90% of the weights.
INT8_OP_TYPES = ("Gemm", "MatMul")


def convert_weights_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Convert the weight matrices and kernels of a copy of ``model`` to float16.

    Each converted initializer feeds a Cast back to float32, so every op still
    computes in float32 and the graph's input and output types stay the same.
    onnxruntime folds these Casts when it loads the model, which halves the
    file but not the memory or time of inference. Initializers of fewer than
    2 dimensions (biases, normalization constants, step coefficients) stay
    float32: they are a small share of the bytes and sensitive to rounding.
    """
    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    graph = converted.graph
    used_names = {value for node in graph.node for value in node.output}
    used_names.update(initializer.name for initializer in graph.initializer)

    casts = []
    for initializer in graph.initializer:
        if initializer.data_type != onnx.TensorProto.FLOAT or len(initializer.dims) < 2:
            continue
        name = initializer.name
        half_name = f"{name}.fp16"
        if half_name in used_names:
            raise ExportError(
                f"cannot name the fp16 copy of {name!r}: {half_name!r} exists"
            )
        weights = numpy_helper.to_array(initializer).astype(np.float16)
        if not np.isfinite(weights).all():
            raise ExportError(f"initializer {name!r} overflows float16")
        initializer.CopyFrom(numpy_helper.from_array(weights, half_name))
        casts.append(
            onnx.helper.make_node(
                "Cast",
                [half_name],
                [name],
                name=f"{name}.to_fp32",
                to=onnx.TensorProto.FLOAT,
            )
        )

    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    logger.info("stored %d weight tensors as float16", len(casts))
    return converted


def quantize_weights_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """Quantize the weights of every Gemm and MatMul to int8, in a copy of ``model``.

    Uses onnxruntime's dynamic quantization: weights are quantized per output
    channel at export, activations per batch at run time.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="noprop-int8-") as folder:
        source = Path(folder) / "fp32.onnx"
        prepared = Path(folder) / "prepared.onnx"
        quantized = Path(folder) / "int8.onnx"
        onnx.save(model, source)

        # The fp32 graph is already optimized, so only the shape inference of
        # the pre-processing step runs.
        quant_pre_process(source, prepared, skip_optimization=True)
        quantize_dynamic(
            prepared,
            quantized,
            op_types_to_quantize=list(INT8_OP_TYPES),
            per_channel=True,
            reduce_range=True,
            weight_type=QuantType.QInt8,
        )
        return onnx.load(quantized)


def convert_precision(model: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    """Return ``model`` converted to ``precision``: fp32 (unchanged), fp16 or int8."""
    if precision == "fp32":
        return model
    if precision == "fp16":
        return convert_weights_to_fp16(model)
    if precision == "int8":
        return quantize_weights_int8(model)
    raise ExportError(f"invalid precision {precision!r}; expected one of {PRECISIONS}")
