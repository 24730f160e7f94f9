"""ModelSession's contract checks, on small ONNX graphs built here."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from service.model import (
    CLASS_NAMES_KEY,
    DIMENSION_KEYS,
    INPUT_NAME,
    OUTPUT_NAME,
    ModelError,
    ModelSession,
)
from tests.service.conftest import REPOSITORY_ROOT

CLASS_NAMES = ["a", "b", "c", "d"]
CPU = ["CPUExecutionProvider"]


def write_model(
    path: Path,
    *,
    input_name: str = INPUT_NAME,
    input_type: int = TensorProto.UINT8,
    input_shape: tuple = ("batch", 2, 2, 1),
    class_names: list[str] | None = CLASS_NAMES,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write image (N, 2, 2, 1) -> softmax over its 4 pixels, as probabilities."""
    nodes = [
        helper.make_node("Cast", [input_name], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["pixels", "shape"], ["flat"]),
        helper.make_node("Softmax", ["flat"], [OUTPUT_NAME], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(input_name, input_type, list(input_shape))],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 4])],
        initializer=[helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    props = dict(metadata or {})
    if class_names is not None:
        props[CLASS_NAMES_KEY] = json.dumps(class_names)
    helper.set_model_props(model, props)
    onnx.save(model, path)
    return path


def test_session_reads_valid_model(tmp_path):
    path = write_model(tmp_path / "model.onnx")
    session = ModelSession(path, "test", CPU)
    assert session.info.class_names == tuple(CLASS_NAMES)
    assert session.info.input_shape == (2, 2, 1)
    assert session.info.providers == ("CPUExecutionProvider",)
    assert session.info.sha256.startswith(session.info.version)
    assert session.info.metadata[CLASS_NAMES_KEY] == json.dumps(CLASS_NAMES)

    images = np.array([[[[0], [0]], [[0], [50]]]], dtype=np.uint8)  # (1, 2, 2, 1)
    probabilities = session.run(images)
    assert probabilities.shape == (1, 4)
    assert probabilities[0].argmax() == 3
    assert probabilities.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("allow_spinning, entry", [(True, "1"), (False, "0")])
def test_session_sets_thread_spinning(tmp_path, allow_spinning, entry):
    path = write_model(tmp_path / "model.onnx")
    session = ModelSession(path, "test", CPU, 1, allow_spinning)
    options = session._session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == entry
    assert options.intra_op_num_threads == 1


def test_session_warm_up_runs(tmp_path):
    session = ModelSession(write_model(tmp_path / "model.onnx"), "test", CPU)
    assert session.warm_up(3) >= 0


def test_session_run_rejects_wrong_images(tmp_path):
    session = ModelSession(write_model(tmp_path / "model.onnx"), "test", CPU)
    with pytest.raises(ValueError, match="images must be uint8 \\(N, 2, 2, 1\\)"):
        session.run(np.zeros((1, 2, 2, 1), np.float32))
    with pytest.raises(ValueError, match="got uint8 \\(1, 3, 2, 1\\)"):
        session.run(np.zeros((1, 3, 2, 1), np.uint8))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"input_name": "pixels_in"}, "expected \\['image'\\]"),
        ({"input_type": TensorProto.FLOAT}, "input 'image' is tensor\\(float\\)"),
        ({"input_shape": ("batch", "height", 2, 1)}, "with fixed height"),
        ({"class_names": None}, "metadata lacks noprop.class_names"),
        ({"class_names": ["a", "b"]}, "has 2 names .* outputs 4 classes"),
        ({"class_names": ["a", "a", "b", "c"]}, "3 distinct"),
        ({"metadata": {DIMENSION_KEYS[0]: "28"}}, "noprop.input_height='28' differs"),
    ],
)
def test_session_rejects_contract_violation(tmp_path, options, message):
    path = write_model(tmp_path / "model.onnx", **options)
    with pytest.raises(ModelError, match=message):
        ModelSession(path, "test", CPU)


def test_session_rejects_unreadable_file(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not an onnx model")
    with pytest.raises(ModelError, match="onnxruntime cannot load"):
        ModelSession(path, "test", CPU)


def test_session_rejects_unavailable_providers(tmp_path):
    path = write_model(tmp_path / "model.onnx")
    with pytest.raises(ModelError, match="none of the execution providers"):
        ModelSession(path, "test", ["MIGraphXExecutionProvider"])


def read_constants(path: Path) -> dict[str, object]:
    """Read a module's top-level constants from its source, without importing it.

    Importing export/ would import torch, which takes seconds and which the
    service never loads.
    """
    constants = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and isinstance(node.value, ast.Constant):
                constants[target.id] = node.value.value
    return constants


def test_contract_names_match_exporter():
    graph = read_constants(REPOSITORY_ROOT / "export" / "graph.py")
    metadata = read_constants(REPOSITORY_ROOT / "export" / "metadata.py")
    assert graph["INPUT_NAME"] == INPUT_NAME
    assert graph["OUTPUT_NAME"] == OUTPUT_NAME
    assert metadata["CLASS_NAMES"] == CLASS_NAMES_KEY
    assert (
        metadata["INPUT_HEIGHT"],
        metadata["INPUT_WIDTH"],
        metadata["INPUT_CHANNELS"],
    ) == DIMENSION_KEYS
