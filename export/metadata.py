"""Write and read the ONNX metadata_props of an exported NoProp model.

Every value is a string, as ONNX requires. The keys are listed in the package
docstring (``export/__init__.py``) and in docs/export.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import onnx

PREFIX = "noprop."
CLASS_NAMES = "noprop.class_names"
DATASET = "noprop.dataset"
VARIANT = "noprop.variant"
NUM_STEPS = "noprop.num_steps"
INPUT_HEIGHT = "noprop.input_height"
INPUT_WIDTH = "noprop.input_width"
INPUT_CHANNELS = "noprop.input_channels"
LABEL_EMBEDDING = "noprop.label_embedding"
PRECISION = "noprop.precision"
TEST_ACCURACY = "noprop.test_accuracy"
TEST_IMAGES = "noprop.test_images"
CHECKPOINT_SHA256 = "noprop.checkpoint_sha256"
EXPORTER_VERSION = "noprop.exporter_version"

KEYS = (
    CLASS_NAMES,
    DATASET,
    VARIANT,
    NUM_STEPS,
    INPUT_HEIGHT,
    INPUT_WIDTH,
    INPUT_CHANNELS,
    LABEL_EMBEDDING,
    PRECISION,
    TEST_ACCURACY,
    TEST_IMAGES,
    CHECKPOINT_SHA256,
    EXPORTER_VERSION,
)


class MetadataError(Exception):
    """An ONNX model lacks a NoProp metadata key or has an invalid value."""


@dataclass(frozen=True)
class ModelMetadata:
    """The facts about an exported model that a service needs besides the graph."""

    class_names: tuple[str, ...]
    dataset: str
    variant: str  # "dt", "ct", "fm" or "backprop"
    num_steps: int
    input_height: int
    input_width: int
    input_channels: int
    label_embedding: str  # "one-hot", "learned" or "prototype"
    precision: str  # "fp32", "fp16" or "int8"
    test_accuracy: float  # fraction in [0, 1], measured on this ONNX file
    test_images: int  # number of test images that test_accuracy was measured on
    checkpoint_sha256: str
    exporter_version: str

    def to_props(self) -> dict[str, str]:
        """Return the metadata_props entries, every value a string."""
        return {
            CLASS_NAMES: json.dumps(list(self.class_names)),
            DATASET: self.dataset,
            VARIANT: self.variant,
            NUM_STEPS: str(self.num_steps),
            INPUT_HEIGHT: str(self.input_height),
            INPUT_WIDTH: str(self.input_width),
            INPUT_CHANNELS: str(self.input_channels),
            LABEL_EMBEDDING: self.label_embedding,
            PRECISION: self.precision,
            TEST_ACCURACY: repr(self.test_accuracy),
            TEST_IMAGES: str(self.test_images),
            CHECKPOINT_SHA256: self.checkpoint_sha256,
            EXPORTER_VERSION: self.exporter_version,
        }

    @classmethod
    def from_props(cls, props: dict[str, str]) -> ModelMetadata:
        """Parse metadata_props entries, raising MetadataError for an invalid key."""
        missing = [key for key in KEYS if key not in props]
        if missing:
            raise MetadataError(f"model metadata is missing {', '.join(missing)}")
        class_names = _parse(props, CLASS_NAMES, json.loads)
        if not isinstance(class_names, list) or not all(
            isinstance(name, str) for name in class_names
        ):
            raise MetadataError(
                f"{CLASS_NAMES} must be a JSON list of strings, "
                f"got {props[CLASS_NAMES]!r}"
            )
        return cls(
            class_names=tuple(class_names),
            dataset=props[DATASET],
            variant=props[VARIANT],
            num_steps=_parse(props, NUM_STEPS, int),
            input_height=_parse(props, INPUT_HEIGHT, int),
            input_width=_parse(props, INPUT_WIDTH, int),
            input_channels=_parse(props, INPUT_CHANNELS, int),
            label_embedding=props[LABEL_EMBEDDING],
            precision=props[PRECISION],
            test_accuracy=_parse(props, TEST_ACCURACY, float),
            test_images=_parse(props, TEST_IMAGES, int),
            checkpoint_sha256=props[CHECKPOINT_SHA256],
            exporter_version=props[EXPORTER_VERSION],
        )


def _parse(props: dict[str, str], key: str, parser):
    try:
        return parser(props[key])
    except ValueError as error:
        raise MetadataError(
            f"invalid value {props[key]!r} for {key}: {error}"
        ) from error


def write_metadata(model: onnx.ModelProto, metadata: ModelMetadata) -> None:
    """Replace the model's NoProp metadata_props, keeping other keys."""
    props = {
        entry.key: entry.value
        for entry in model.metadata_props
        if not entry.key.startswith(PREFIX)
    }
    props.update(metadata.to_props())
    onnx.helper.set_model_props(model, props)


def read_metadata(model: onnx.ModelProto) -> ModelMetadata:
    """Parse the NoProp metadata_props of a loaded model."""
    return ModelMetadata.from_props(
        {entry.key: entry.value for entry in model.metadata_props}
    )
