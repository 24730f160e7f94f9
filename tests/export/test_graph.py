"""The exported graph: contract, unrolled steps, dynamic batch, parity with PyTorch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from export.errors import ExportError
from export.graph import (
    FORBIDDEN_OPS,
    build_onnx_model,
    check_contract,
    find_forbidden_ops,
)
from training.data import DatasetInfo, normalize
from training.evaluation import load_trained_model
from training.model import ModelConfig, NoPropNet

RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike"}
MNIST_INFO = DatasetInfo(
    "mnist", tuple("0123456789"), (1, 28, 28), (0.1307,), (0.3081,)
)


def run_onnx(model: onnx.ModelProto, images: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    nhwc = images.permute(0, 2, 3, 1).contiguous().numpy()
    return session.run(None, {"image": nhwc})[0]


def run_torch(model: NoPropNet, info: DatasetInfo, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        logits = model(normalize(images, info), deterministic=True)
    return torch.softmax(logits, dim=1).numpy()


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def test_graph_has_no_loop_or_random_ops(fp32_model):
    types = set(op_types(fp32_model))

    assert "Loop" not in types
    assert "Scan" not in types
    assert not types & RANDOM_OPS
    assert find_forbidden_ops(fp32_model) == []


def test_graph_unrolls_every_block(fp32_model, tiny_mnist_checkpoint):
    num_steps = load_trained_model(tiny_mnist_checkpoint).model.config.num_steps
    types = op_types(fp32_model)

    # Each block has three convolutions, and each step has one softmax for
    # u_hat. The last softmax gives the output probabilities.
    assert types.count("Conv") == 3 * num_steps
    assert types.count("Softmax") == num_steps + 1


def test_graph_input_and_output_contract(fp32_model):
    (image,) = fp32_model.graph.input
    (probabilities,) = fp32_model.graph.output
    image_dims = image.type.tensor_type.shape.dim
    output_dims = probabilities.type.tensor_type.shape.dim

    assert image.name == "image"
    assert image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert image_dims[0].dim_param
    assert [dim.dim_value for dim in image_dims[1:]] == [28, 28, 1]
    assert probabilities.name == "probabilities"
    assert probabilities.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert output_dims[0].dim_param
    assert output_dims[1].dim_value == 10


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_dynamic_batch_matches_pytorch(
    fp32_model, tiny_mnist_checkpoint, mnist_test_images, batch_size
):
    trained = load_trained_model(tiny_mnist_checkpoint)
    images = mnist_test_images[:batch_size]

    probabilities = run_onnx(fp32_model, images)
    expected = run_torch(trained.model, trained.dataset, images)

    assert probabilities.shape == (batch_size, 10)
    assert probabilities.dtype == np.float32
    assert np.abs(probabilities - expected).max() < 1e-4
    assert (probabilities.argmax(1) == expected.argmax(1)).all()
    assert np.allclose(probabilities.sum(1), 1.0, atol=1e-5)


def make_image_sensitive(model: NoPropNet, x: torch.Tensor) -> None:
    """Give a fresh model outputs that vary strongly from image to image.

    A new model has a zero classifier and batch norms with default statistics,
    so its outputs are near uniform. Here the last layer of each block and the
    classifier get random weights, and every batch norm takes its statistics
    from ``x`` (normalized images), so that an error in the graph shows.
    """
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.blocks:
            block.head[-1].weight.normal_(0.0, 0.5, generator=generator)
        model.classifier.weight.normal_(0.0, 0.03, generator=generator)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.reset_running_stats()
                module.momentum = None  # a plain average over the batches seen
        model.train()
        model(x, deterministic=True)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d):
                # A feature that is nearly constant on the images would turn
                # float rounding into large differences.
                module.running_var.clamp_(min=0.01)
    model.eval()


def test_backprop_prototype_rgb_graph_matches_pytorch(cifar10_test_images):
    images, info = cifar10_test_images
    config = ModelConfig(
        image_shape=info.image_shape,
        num_classes=len(info.class_names),
        variant="backprop",
        num_steps=2,
        embedding="prototype",
        dropout=0.0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = NoPropNet(config)
    x = normalize(images, info)
    with torch.no_grad():
        model.embedding.weight.copy_(x[:10].flatten(1))
    make_image_sensitive(model, x)

    onnx_model = build_onnx_model(model, info)
    check_contract(onnx_model, info)
    probabilities = run_onnx(onnx_model, images)
    expected = run_torch(model, info, images)
    reversed_channels = run_torch(model, info, images.flip(1))

    # The model must tell RGB from BGR for this test to catch a wrong channel
    # order in the graph.
    assert np.abs(reversed_channels - expected).max() > 0.05
    assert len(set(expected.argmax(1))) > 1
    assert np.abs(probabilities - expected).max() < 1e-4
    assert (probabilities.argmax(1) == expected.argmax(1)).all()


def test_find_forbidden_ops_lists_loop_and_random():
    nodes = [
        onnx.helper.make_node("RandomNormalLike", ["x"], ["noise"]),
        onnx.helper.make_node("Add", ["x", "noise"], ["y"]),
    ]
    body = onnx.helper.make_graph(
        [onnx.helper.make_node("Dropout", ["y"], ["z"])], "body", [], []
    )
    nodes.append(onnx.helper.make_node("Loop", ["", "", "y"], ["out"], body=body))
    graph = onnx.helper.make_graph(nodes, "graph", [], [])

    found = find_forbidden_ops(onnx.helper.make_model(graph))

    assert found == ["Dropout", "Loop", "RandomNormalLike"]
    assert set(found) <= FORBIDDEN_OPS


def test_check_contract_rejects_float_input(fp32_model):
    model = onnx.ModelProto()
    model.CopyFrom(fp32_model)
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT

    with pytest.raises(ExportError, match="'image' is FLOAT"):
        check_contract(model, MNIST_INFO)


def test_check_contract_rejects_fixed_batch(fp32_model):
    model = onnx.ModelProto()
    model.CopyFrom(fp32_model)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 8

    with pytest.raises(ExportError, match="dynamic batch"):
        check_contract(model, MNIST_INFO)
