"""Compare an exported ONNX model with the PyTorch model on real test images."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm

from export.graph import INPUT_NAME
from training.data import DatasetInfo
from training.evaluation import predict_logits
from training.model import NoPropNet

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 256


@dataclass(frozen=True)
class Tolerance:
    """Bounds an exported model must meet against the PyTorch model."""

    max_abs_diff: float  # on probabilities, over every image and class
    max_accuracy_gap: float  # |ONNX accuracy - PyTorch accuracy|, a fraction
    same_argmax: bool  # every image must get PyTorch's top class
    max_row_sum_error: float = 1e-4  # |sum of a probability row - 1|


# fp32 must match PyTorch up to float rounding. The fp16 and int8 variants
# change the weights, so their bounds are looser and a near-tie may flip their
# top class. Their accuracy must stay within 0.2 and 1 percentage points.
# NOTE: the bounds were checked against measurements on MNIST only (T = 10,
# full test split: max differences 4.8e-7, 8.9e-4 and 1.9e-2), not on CIFAR.
TOLERANCES = {
    "fp32": Tolerance(max_abs_diff=1e-4, max_accuracy_gap=0.0005, same_argmax=True),
    "fp16": Tolerance(max_abs_diff=1e-2, max_accuracy_gap=0.002, same_argmax=False),
    "int8": Tolerance(max_abs_diff=0.1, max_accuracy_gap=0.01, same_argmax=False),
}


@dataclass(frozen=True)
class VerificationResult:
    """Comparison of an exported model's outputs with PyTorch's on test images."""

    precision: str
    images: int
    max_abs_diff: float
    mean_abs_diff: float
    argmax_mismatches: int
    max_row_sum_error: float
    accuracy: float  # of the ONNX model, a fraction
    torch_accuracy: float
    tolerance: Tolerance

    @property
    def accuracy_gap(self) -> float:
        return abs(self.accuracy - self.torch_accuracy)

    def describe(self) -> str:
        """Format the measured numbers as one line."""
        return (
            f"accuracy {100 * self.accuracy:.2f}% "
            f"(PyTorch {100 * self.torch_accuracy:.2f}%), "
            f"max |dp| {self.max_abs_diff:.3g}, mean |dp| {self.mean_abs_diff:.3g}, "
            f"top-class mismatches {self.argmax_mismatches}"
        )

    def failures(self) -> list[str]:
        """Return one message per bound that the result violates."""
        bound = self.tolerance
        messages = []
        if not self.max_abs_diff < bound.max_abs_diff:
            messages.append(
                f"max absolute difference of probabilities {self.max_abs_diff:.3g} "
                f"is not below {bound.max_abs_diff:g}"
            )
        if bound.same_argmax and self.argmax_mismatches:
            messages.append(
                f"{self.argmax_mismatches} of {self.images} images get a different "
                "top class than in PyTorch"
            )
        if not self.accuracy_gap <= bound.max_accuracy_gap:
            messages.append(
                f"accuracy {100 * self.accuracy:.2f}% differs from PyTorch's "
                f"{100 * self.torch_accuracy:.2f}% by {100 * self.accuracy_gap:.3f} "
                f"percentage points (allowed: {100 * bound.max_accuracy_gap:.3f})"
            )
        if not self.max_row_sum_error <= bound.max_row_sum_error:
            messages.append(
                f"a probability row sums to 1 +- {self.max_row_sum_error:.3g} "
                f"(allowed: {bound.max_row_sum_error:g})"
            )
        return messages


def torch_probabilities(
    model: NoPropNet,
    images: torch.Tensor,
    dataset: DatasetInfo,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> np.ndarray:
    """Return probabilities (N, num_classes) of the deterministic PyTorch path."""
    starts = range(0, images.shape[0], batch_size)
    logits = [
        predict_logits(model, images[start : start + batch_size], dataset, batch_size)
        for start in tqdm(starts, desc="verify: PyTorch", unit="batch", leave=False)
    ]
    return torch.softmax(torch.cat(logits), dim=1).numpy()


def create_session(path: str | os.PathLike) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def onnx_probabilities(
    session: ort.InferenceSession,
    images: torch.Tensor,
    batch_size: int = DEFAULT_BATCH_SIZE,
    description: str = "onnxruntime",
) -> np.ndarray:
    """Run uint8 images (N, C, H, W) through the model in batches."""
    nhwc = images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, C)
    starts = range(0, nhwc.shape[0], batch_size)
    outputs = [
        session.run(None, {INPUT_NAME: nhwc[start : start + batch_size]})[0]
        for start in tqdm(starts, desc=description, unit="batch", leave=False)
    ]
    return np.concatenate(outputs)


def compare(
    precision: str,
    probabilities: np.ndarray,
    reference: np.ndarray,
    labels: np.ndarray,
) -> VerificationResult:
    """Measure ``probabilities`` of the ONNX model against PyTorch's ``reference``."""
    if probabilities.shape != reference.shape:
        raise ValueError(
            f"ONNX output has shape {probabilities.shape}; "
            f"PyTorch output has {reference.shape}"
        )
    difference = np.abs(probabilities.astype(np.float64) - reference)
    predictions = probabilities.argmax(1)
    row_sums = probabilities.astype(np.float64).sum(1)
    return VerificationResult(
        precision=precision,
        images=len(labels),
        max_abs_diff=float(difference.max()),
        mean_abs_diff=float(difference.mean()),
        argmax_mismatches=int((predictions != reference.argmax(1)).sum()),
        max_row_sum_error=float(np.abs(row_sums - 1.0).max()),
        accuracy=float((predictions == labels).mean()),
        torch_accuracy=float((reference.argmax(1) == labels).mean()),
        tolerance=TOLERANCES[precision],
    )
