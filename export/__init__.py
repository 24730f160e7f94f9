"""Export trained NoProp checkpoints to verified ONNX models for the service.

Command line: ``python -m export CHECKPOINT -o model.onnx`` or ``noprop-export``.
Python: ``export_checkpoint(checkpoint, output) -> ExportReport``.

The model contract:

- One input ``image``: uint8, [batch, height, width, channels] (NHWC). The
  batch is dynamic; height, width and channels are fixed by the model. The
  graph scales pixels to [0, 1] and standardizes them with the dataset's
  per-channel mean and std.
- One output ``probabilities``: float32, [batch, num_classes]; each row is a
  softmax and sums to 1.
- The T denoising steps are unrolled: z_0 = 0, the step coefficients, every
  block and the final classifier are in the one graph, with no Loop and no
  random op, so the same image always gets the same output. For NoProp-CT and
  NoProp-FM, the N Euler or Heun steps of the ODE are unrolled the same way.

ONNX metadata_props (all values are strings):

- ``noprop.class_names``: JSON list of the class names, in output order.
- ``noprop.dataset``: dataset name, e.g. "mnist" or "cifar10".
- ``noprop.variant``: "dt" (NoProp-DT), "ct" (NoProp-CT), "fm" (NoProp-FM)
  or "backprop" (the baseline).
- ``noprop.num_steps``: number of denoising steps T, or of integration steps
  for "ct" and "fm".
- ``noprop.input_height``, ``noprop.input_width``, ``noprop.input_channels``:
  the fixed dimensions of ``image``.
- ``noprop.label_embedding``: "one-hot", "learned" or "prototype".
- ``noprop.precision``: "fp32", "fp16" (float16 weights, float32 compute) or
  "int8" (dynamically quantized fully connected layers).
- ``noprop.test_accuracy``: accuracy of this ONNX file on the test images used
  at export, a fraction in [0, 1].
- ``noprop.test_images``: the number of those test images (the first N of the
  test split; the whole split unless ``--verify-images`` was given).
- ``noprop.checkpoint_sha256``: sha256 of the checkpoint file.
- ``noprop.exporter_version``: version of this exporter (``EXPORTER_VERSION``).

``export.metadata.ModelMetadata.from_props`` parses these keys, for example
from ``onnxruntime.InferenceSession(...).get_modelmeta().custom_metadata_map``.
"""

from export.errors import ExportError, VerificationError
from export.exporter import (
    EXPORTER_VERSION,
    ExportedFile,
    ExportReport,
    export_checkpoint,
    variant_path,
)
from export.metadata import ModelMetadata, read_metadata

__all__ = [
    "EXPORTER_VERSION",
    "ExportError",
    "ExportReport",
    "ExportedFile",
    "ModelMetadata",
    "VerificationError",
    "export_checkpoint",
    "read_metadata",
    "variant_path",
]
