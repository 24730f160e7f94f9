"""The benchmark's peer: the default ONNX model behind BentoML's adaptive batching.

benchmarks/serving.py starts it in the peer venv (the ``peer`` extra):

    BENTOML_DO_NOT_TRACK=true PEER_MODEL_PATH=models/mnist-dt-onehot/model.onnx \\
        .venv-peer/bin/bentoml serve benchmarks.peer_bentoml:NoPropClassifier \\
        --host 127.0.0.1 --port 3000

It follows BentoML's adaptive batching guide (docs/source/get-started/
adaptive-batching.rst in BentoML's repository, for BentoML 1.4): one batchable
endpoint whose only parameter is the list of inputs, with ``max_batch_size``
and ``max_latency_ms`` set on ``@bentoml.api``, in one worker process. The
inputs are image files in the multipart field ``images``, the same bodies the
benchmark sends to the service. To compare serving stacks rather than
inference code, it runs the model with the service's own ModelSession, so
both have the same onnxruntime session options, and converts images as the
service's decoder does for MNIST's 28x28 greyscale PNGs.
"""

from __future__ import annotations

import os
from pathlib import Path

import bentoml
import numpy as np
from PIL import Image

from service.model import ModelSession

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_PATH = REPOSITORY_ROOT / "models" / "mnist-dt-onehot" / "model.onnx"
MODEL_PATH = Path(os.environ.get("PEER_MODEL_PATH", str(DEFAULT_MODEL_PATH)))
MAX_BATCH_SIZE = int(os.environ.get("PEER_MAX_BATCH_SIZE", "32"))
# The guide's example value: the longest a request waits for its batch to form.
MAX_LATENCY_MS = int(os.environ.get("PEER_MAX_LATENCY_MS", "1000"))
INTRA_OP_NUM_THREADS = int(os.environ.get("PEER_INTRA_OP_NUM_THREADS", "0"))


@bentoml.service(workers=1, traffic={"timeout": 30})
class NoPropClassifier:
    """Classify images in batches formed by BentoML's dispatcher."""

    def __init__(self) -> None:
        self.model = ModelSession(
            MODEL_PATH,
            "peer",
            ["CPUExecutionProvider"],
            INTRA_OP_NUM_THREADS,
        )
        self.model.warm_up(MAX_BATCH_SIZE)

    @bentoml.api(
        batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS
    )
    def classify(self, images: list[Image.Image]) -> list[dict[str, float]]:
        """Return every class's probability for each image, by class name."""
        height, width, channels = self.model.info.input_shape
        mode = "L" if channels == 1 else "RGB"
        arrays = []
        for image in images:
            image = image.convert(mode)
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.LANCZOS)
            arrays.append(
                np.asarray(image, dtype=np.uint8).reshape(height, width, channels)
            )
        probabilities = self.model.run(np.stack(arrays))  # (N, num_classes)
        names = self.model.info.class_names
        return [dict(zip(names, row.tolist(), strict=True)) for row in probabilities]
