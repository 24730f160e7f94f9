"""The onnxruntime session of an exported NoProp model, and its contract checks.

The exporter sets the contract. The graph has one input ``image``, uint8
[batch, height, width, channels] with a dynamic batch, and one output
``probabilities``, float32 [batch, num_classes]. The metadata_props entry
``noprop.class_names`` contains the class names as a JSON list.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

logger = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
CLASS_NAMES_KEY = "noprop.class_names"
DIMENSION_KEYS = ("noprop.input_height", "noprop.input_width", "noprop.input_channels")


class ModelError(Exception):
    """The model file cannot be served: it breaks the contract or fails to load."""


@dataclass(frozen=True)
class ModelInfo:
    """Facts about the loaded model that the service reports."""

    name: str
    version: str  # first 12 hex digits of the file's sha256
    path: Path
    sha256: str
    class_names: tuple[str, ...]
    input_shape: tuple[int, int, int]  # (height, width, channels)
    providers: tuple[str, ...]  # active execution providers, in priority order
    metadata: dict[str, str]  # every metadata_props entry of the file

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class ModelSession:
    """An onnxruntime session that checks its inputs and outputs on every run.

    onnxruntime allows concurrent ``run`` calls, but the service calls this
    object from one worker thread only, so that batches never compete for cores.
    """

    def __init__(
        self,
        path: Path,
        name: str,
        providers: list[str],
        intra_op_num_threads: int = 0,
        intra_op_allow_spinning: bool = True,
    ) -> None:
        available = ort.get_available_providers()
        usable = [provider for provider in providers if provider in available]
        skipped = [provider for provider in providers if provider not in available]
        if skipped:
            logger.info(
                "skipping execution providers that this onnxruntime build lacks: %s",
                ", ".join(skipped),
            )
        if not usable:
            raise ModelError(
                f"none of the execution providers {providers} is available; "
                f"this onnxruntime build has {available}"
            )

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_num_threads
        options.inter_op_num_threads = 1
        # Spinning threads poll for work between operators. That shortens a
        # batch on an idle machine, but takes CPU from other work on the cores.
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if intra_op_allow_spinning else "0"
        )
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=options, providers=usable
            )
        except Exception as error:  # onnxruntime raises several unrelated types
            raise ModelError(f"onnxruntime cannot load {path}: {error}") from error

        sha256 = sha256_file(path)
        metadata = dict(self._session.get_modelmeta().custom_metadata_map)
        input_shape, num_classes = check_signature(self._session)
        self.info = ModelInfo(
            name=name,
            version=sha256[:12],
            path=path,
            sha256=sha256,
            class_names=read_class_names(metadata, num_classes),
            input_shape=input_shape,
            providers=tuple(self._session.get_providers()),
            metadata=metadata,
        )
        check_dimension_metadata(metadata, input_shape)

    def run(self, images: np.ndarray) -> np.ndarray:
        """Classify uint8 images (N, H, W, C); return probabilities (N, num_classes)."""
        expected = self.info.input_shape
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(
                f"images must be uint8 (N, {', '.join(map(str, expected))}), "
                f"got {images.dtype} {images.shape}"
            )
        (probabilities,) = self._session.run([OUTPUT_NAME], {INPUT_NAME: images})
        if probabilities.shape != (len(images), self.info.num_classes):
            raise ModelError(
                f"model returned probabilities of shape {probabilities.shape} for "
                f"{len(images)} images; expected ({len(images)}, "
                f"{self.info.num_classes})"
            )
        return probabilities

    def warm_up(self, max_batch_size: int) -> float:
        """Run every batch size from 1 to ``max_batch_size`` once; return seconds.

        The first run of a shape allocates memory and, on CUDA, selects kernels,
        so warming up keeps that cost out of the first requests.
        """
        start = time.perf_counter()
        height, width, channels = self.info.input_shape
        for batch_size in range(1, max_batch_size + 1):
            self.run(np.zeros((batch_size, height, width, channels), np.uint8))
        return time.perf_counter() - start


def check_signature(session: ort.InferenceSession) -> tuple[tuple[int, int, int], int]:
    """Check the graph's input and output; return (H, W, C) and num_classes."""
    inputs = session.get_inputs()
    outputs = session.get_outputs()
    input_names = [value.name for value in inputs]
    output_names = [value.name for value in outputs]
    if input_names != [INPUT_NAME] or output_names != [OUTPUT_NAME]:
        raise ModelError(
            f"model has inputs {input_names} and outputs {output_names}; "
            f"expected [{INPUT_NAME!r}] and [{OUTPUT_NAME!r}]"
        )

    image, probabilities = inputs[0], outputs[0]
    if image.type != "tensor(uint8)" or not _is_batched(image.shape, 4):
        raise ModelError(
            f"input {INPUT_NAME!r} is {image.type} {image.shape}; expected "
            "tensor(uint8) [batch, height, width, channels] with fixed height, "
            "width and channels"
        )
    if probabilities.type != "tensor(float)" or not _is_batched(probabilities.shape, 2):
        raise ModelError(
            f"output {OUTPUT_NAME!r} is {probabilities.type} {probabilities.shape}; "
            "expected tensor(float) [batch, num_classes] with fixed num_classes"
        )
    height, width, channels = image.shape[1:]
    if channels not in (1, 3):
        raise ModelError(f"input has {channels} channels; expected 1 or 3")
    return (height, width, channels), probabilities.shape[1]


def _is_batched(shape: list, rank: int) -> bool:
    """Return True when ``shape`` has ``rank`` dimensions, all fixed but the batch."""
    if len(shape) != rank:
        return False
    return all(isinstance(size, int) and size > 0 for size in shape[1:])


def read_class_names(metadata: dict[str, str], num_classes: int) -> tuple[str, ...]:
    """Parse the class names from metadata and check them against the output."""
    if CLASS_NAMES_KEY not in metadata:
        raise ModelError(
            f"model metadata lacks {CLASS_NAMES_KEY}; export the model with "
            "python -m export"
        )
    try:
        names = json.loads(metadata[CLASS_NAMES_KEY])
    except json.JSONDecodeError as error:
        raise ModelError(f"{CLASS_NAMES_KEY} is not valid JSON: {error}") from error
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ModelError(f"{CLASS_NAMES_KEY} must be a JSON list of strings")
    if len(names) != num_classes or len(set(names)) != len(names):
        raise ModelError(
            f"{CLASS_NAMES_KEY} has {len(names)} names ({len(set(names))} distinct); "
            f"the model outputs {num_classes} classes"
        )
    return tuple(names)


def check_dimension_metadata(
    metadata: dict[str, str], input_shape: tuple[int, int, int]
) -> None:
    """Raise ModelError when the metadata's input size differs from the graph's."""
    for key, size in zip(DIMENSION_KEYS, input_shape, strict=True):
        if key in metadata and metadata[key] != str(size):
            raise ModelError(
                f"metadata {key}={metadata[key]!r} differs from the graph's input "
                f"size {size}"
            )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
