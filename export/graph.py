"""Build the ONNX graph of a NoProp network with torch.onnx and check its contract.

The graph takes uint8 images (batch, height, width, channels) and returns
float32 class probabilities (batch, num_classes). Scaling to [0, 1], the
per-channel standardization, z_0 = 0, every denoising step and the final
classifier are inside it. Tracing unrolls the Python loop over the T blocks,
so the graph has no Loop node.
"""

from __future__ import annotations

import logging

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from export.errors import ExportError
from training.data import DatasetInfo
from training.model import NoPropNet

logger = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
DEFAULT_OPSET = 18
MIN_OPSET = 17

# Ops that would make the deterministic graph random or data-dependent in
# length: samplers, Dropout (random when training_mode is set) and control flow.
FORBIDDEN_OPS = frozenset(
    {
        "Bernoulli",
        "Dropout",
        "If",
        "Loop",
        "Multinomial",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Scan",
    }
)


class ProbabilityModel(nn.Module):
    """The exported computation: uint8 NHWC images -> class probabilities.

    The normalization repeats ``training.data.normalize`` operation for
    operation, so the graph computes the same floats as the PyTorch model.
    """

    def __init__(self, model: NoPropNet, dataset: DatasetInfo) -> None:
        super().__init__()
        self.model = model
        mean = torch.tensor(dataset.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(dataset.std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float() / 255.0  # (B, H, W, C) -> (B, C, H, W)
        x = (x - self.mean) / self.std
        logits = self.model(x, deterministic=True)  # (B, num_classes)
        return F.softmax(logits, dim=1)


def build_onnx_model(
    model: NoPropNet, dataset: DatasetInfo, opset: int = DEFAULT_OPSET
) -> onnx.ModelProto:
    """Export the deterministic inference path of ``model`` as an ONNX model.

    Uses the torch.export-based exporter (``dynamo=True``) with its default
    onnxscript optimizer, which folds constants and batch norms into the
    preceding Gemm and removes unused nodes.
    """
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old; use {MIN_OPSET} or newer")
    wrapper = ProbabilityModel(model, dataset).eval()
    channels, height, width = dataset.image_shape

    # A batch of 2: torch.export specializes a dimension whose example size is 1.
    example = torch.zeros((2, height, width, channels), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes={"image": {0: batch}},
            optimize=True,
            verbose=False,
        )
    return program.model_proto


def iter_nodes(graph: onnx.GraphProto):
    """Yield every node of ``graph``, including nodes of subgraphs."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from iter_nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from iter_nodes(subgraph)


def find_forbidden_ops(model: onnx.ModelProto) -> list[str]:
    """List the forbidden op types in the graph and its functions, sorted by name."""
    nodes = list(iter_nodes(model.graph))
    for function in model.functions:
        nodes.extend(function.node)
    return sorted({node.op_type for node in nodes if node.op_type in FORBIDDEN_OPS})


def check_contract(model: onnx.ModelProto, dataset: DatasetInfo) -> None:
    """Raise ExportError unless the model has the service's input and output.

    Expected: one input ``image``, uint8 [batch, H, W, C] with batch dynamic,
    one output ``probabilities``, float32 [batch, num_classes], and no
    forbidden op.
    """
    channels, height, width = dataset.image_shape
    num_classes = len(dataset.class_names)
    inputs = [value.name for value in model.graph.input]
    outputs = [value.name for value in model.graph.output]
    if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
        raise ExportError(
            f"graph has inputs {inputs} and outputs {outputs}; "
            f"expected [{INPUT_NAME!r}] and [{OUTPUT_NAME!r}]"
        )
    _check_value(
        model.graph.input[0], onnx.TensorProto.UINT8, [height, width, channels]
    )
    _check_value(model.graph.output[0], onnx.TensorProto.FLOAT, [num_classes])
    forbidden = find_forbidden_ops(model)
    if forbidden:
        raise ExportError(f"graph contains forbidden ops: {', '.join(forbidden)}")


def _check_value(
    value: onnx.ValueInfoProto, elem_type: int, fixed_dims: list[int]
) -> None:
    tensor_type = value.type.tensor_type
    dims = list(tensor_type.shape.dim)
    batch_is_dynamic = bool(dims) and not dims[0].HasField("dim_value")
    fixed = [dim.dim_value if dim.HasField("dim_value") else None for dim in dims[1:]]
    if (
        tensor_type.elem_type != elem_type
        or not batch_is_dynamic
        or fixed != fixed_dims
    ):
        expected_type = onnx.TensorProto.DataType.Name(elem_type)
        actual_type = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
        raise ExportError(
            f"{value.name!r} is {actual_type} {_format_dims(dims)}; "
            f"expected {expected_type} [batch, {', '.join(map(str, fixed_dims))}] "
            "with a dynamic batch"
        )


def _format_dims(dims: list[onnx.TensorShapeProto.Dimension]) -> str:
    names = [
        str(dim.dim_value) if dim.HasField("dim_value") else dim.dim_param or "?"
        for dim in dims
    ]
    return f"[{', '.join(names)}]"
