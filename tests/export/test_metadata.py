"""ONNX metadata_props: written at export, read back by onnx and onnxruntime."""

from __future__ import annotations

import hashlib
import json

import onnx
import onnxruntime as ort
import pytest

from export import EXPORTER_VERSION, ModelMetadata, read_metadata
from export.metadata import KEYS, MetadataError, write_metadata
from tests.export.conftest import VERIFY_IMAGES
from training.evaluation import load_trained_model


def test_metadata_round_trip(export_report, fp32_model, tiny_mnist_checkpoint):
    trained = load_trained_model(tiny_mnist_checkpoint)
    metadata = read_metadata(fp32_model)
    sha256 = hashlib.sha256(tiny_mnist_checkpoint.read_bytes()).hexdigest()

    assert metadata.class_names == trained.dataset.class_names
    assert metadata.dataset == "mnist"
    assert metadata.variant == "dt"
    assert metadata.num_steps == trained.model.config.num_steps
    assert (metadata.input_height, metadata.input_width) == (28, 28)
    assert metadata.input_channels == 1
    assert metadata.label_embedding == "one-hot"
    assert metadata.precision == "fp32"
    assert metadata.test_accuracy == export_report.files[0].verification.accuracy
    assert metadata.test_images == VERIFY_IMAGES
    assert metadata.checkpoint_sha256 == sha256
    assert metadata.exporter_version == EXPORTER_VERSION


def test_metadata_reads_through_onnxruntime(fp32_path, fp32_model):
    session = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map

    assert set(KEYS) <= set(props)
    assert json.loads(props["noprop.class_names"]) == [str(d) for d in range(10)]
    assert ModelMetadata.from_props(props) == read_metadata(fp32_model)


def test_variants_record_their_precision(export_report):
    for file in export_report.files:
        metadata = read_metadata(onnx.load(file.path))

        assert metadata.precision == file.precision
        assert metadata.test_accuracy == file.verification.accuracy


def test_write_metadata_keeps_other_keys(fp32_model):
    model = onnx.ModelProto()
    model.CopyFrom(fp32_model)
    onnx.helper.set_model_props(model, {"owner": "team", "noprop.dataset": "old"})

    write_metadata(model, read_metadata(fp32_model))
    props = {entry.key: entry.value for entry in model.metadata_props}

    assert props["owner"] == "team"
    assert props["noprop.dataset"] == "mnist"


def test_from_props_rejects_missing_key(fp32_model):
    props = read_metadata(fp32_model).to_props()
    del props["noprop.num_steps"]

    with pytest.raises(MetadataError, match="is missing noprop.num_steps"):
        ModelMetadata.from_props(props)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("noprop.class_names", "zero, one", "invalid value 'zero, one'"),
        ("noprop.class_names", '{"a": 1}', "JSON list of strings"),
        ("noprop.input_height", "28.5", "invalid value '28.5' for noprop.input_height"),
    ],
)
def test_from_props_rejects_invalid_value(fp32_model, key, value, message):
    props = read_metadata(fp32_model).to_props()
    props[key] = value

    with pytest.raises(MetadataError, match=message):
        ModelMetadata.from_props(props)
