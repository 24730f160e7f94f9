"""Export a checkpoint to verified ONNX files: the fp32 model and optional variants.

Every file is written to a temporary name beside its target and renamed only
after it passed verification, so a failed check leaves no file at the target
(an older file there stays untouched).
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from export.errors import ExportError, VerificationError
from export.graph import DEFAULT_OPSET, build_onnx_model, check_contract
from export.metadata import ModelMetadata, read_metadata, write_metadata
from export.precision import PRECISIONS, convert_precision
from export.verification import (
    DEFAULT_BATCH_SIZE,
    VerificationResult,
    compare,
    create_session,
    onnx_probabilities,
    torch_probabilities,
)
from training.continuous import DEFAULT_INTEGRATION
from training.data import DatasetInfo, ImageSplit, load_dataset
from training.evaluation import TrainedModel, load_trained_model, with_integration

logger = logging.getLogger(__name__)

EXPORTER_VERSION = "1.0.0"


@dataclass(frozen=True)
class ExportedFile:
    """One verified ONNX file."""

    path: Path
    precision: str
    size_bytes: int
    verification: VerificationResult
    accuracy_drop: float  # fp32 export accuracy minus this file's, a fraction


@dataclass(frozen=True)
class ExportReport:
    """Files written by one export and their comparison with PyTorch."""

    checkpoint: Path
    checkpoint_sha256: str
    dataset: str
    test_images: int
    torch_accuracy: float
    files: tuple[ExportedFile, ...]

    def summary(self) -> str:
        """Format the report as lines for a terminal."""
        lines = [
            f"checkpoint {self.checkpoint} (sha256 {self.checkpoint_sha256[:12]}...)",
            f"verified on {self.test_images} {self.dataset} test images; "
            f"PyTorch accuracy {100 * self.torch_accuracy:.2f}%",
        ]
        for file in self.files:
            result = file.verification
            drop = ""
            if file.precision != "fp32":
                drop = f" (drop vs fp32 {100 * file.accuracy_drop:.2f} pp)"
            lines.append(
                f"{file.precision}: {file.path} ({file.size_bytes / 1e6:.1f} MB), "
                f"accuracy {100 * result.accuracy:.2f}%{drop}, "
                f"max |dp| {result.max_abs_diff:.2e}, "
                f"top-class mismatches {result.argmax_mismatches}"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class _ExportContext:
    """The checkpoint and the PyTorch outputs that every exported file shares."""

    trained: TrainedModel
    checkpoint_sha256: str
    split: ImageSplit  # the verification images
    probabilities: np.ndarray  # PyTorch's, (N, num_classes)
    batch_size: int


def variant_path(output: str | os.PathLike, precision: str) -> Path:
    """Return the file name of a variant: model.onnx -> model.fp16.onnx."""
    output = Path(output)
    if precision == "fp32":
        return output
    return output.with_name(f"{output.stem}.{precision}{output.suffix}")


def export_checkpoint(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    variants: Iterable[str] = (),
    data_root: str | os.PathLike | None = None,
    verify_images: int = 0,
    opset: int = DEFAULT_OPSET,
    batch_size: int = DEFAULT_BATCH_SIZE,
    steps: int | None = None,
    solver: str | None = None,
) -> ExportReport:
    """Export ``checkpoint`` to ``output`` and to the requested variants.

    ``variants`` may contain "fp16" and "int8", each written to ``variant_path``.
    Verification uses the first ``verify_images`` test images of the
    checkpoint's dataset (0: the whole test split), read from ``data_root`` or
    $NOPROP_DATA_ROOT. Raises CheckpointError for an unreadable checkpoint,
    DatasetError for missing data, ExportError for a failed export and
    VerificationError when a file is outside its tolerance. A failed variant
    does not remove the files that passed.

    A CT or FM model is unrolled with ``steps`` steps of ``solver`` ("euler"
    or "heun"); None takes DEFAULT_INTEGRATION's value for the variant. Both
    must be None for a DT or backprop model, whose steps are its blocks.
    """
    variants = _validate_options(variants, verify_images, batch_size)
    if steps is not None and steps < 1:
        raise ExportError(f"steps must be at least 1, got {steps}")
    trained = load_trained_model(checkpoint)
    variant = trained.model.config.variant
    if variant in DEFAULT_INTEGRATION:
        default_solver, default_steps = DEFAULT_INTEGRATION[variant]
        steps = default_steps if steps is None else steps
        solver = default_solver if solver is None else solver
    try:
        trained = with_integration(trained, steps, solver)
    except ValueError as error:
        raise ExportError(str(error)) from error
    checkpoint_sha256 = sha256_file(checkpoint)
    split = load_test_split(trained.dataset, data_root, verify_images)

    logger.info("running PyTorch on %d test images", len(split))
    probabilities = torch_probabilities(
        trained.model, split.images, trained.dataset, batch_size
    )
    context = _ExportContext(
        trained, checkpoint_sha256, split, probabilities, batch_size
    )
    logger.info("exporting %s with torch.onnx (opset %d)", checkpoint, opset)
    fp32_model = build_onnx_model(trained.model, trained.dataset, opset)

    fp32_file = _write_verified(fp32_model, "fp32", Path(output), context)
    files = [fp32_file]
    failures = []
    for precision in variants:
        model = convert_precision(fp32_model, precision)
        path = variant_path(output, precision)
        try:
            files.append(_write_verified(model, precision, path, context, fp32_file))
        except VerificationError as error:
            failures.append(str(error))

    report = ExportReport(
        checkpoint=Path(checkpoint),
        checkpoint_sha256=checkpoint_sha256,
        dataset=trained.dataset.name,
        test_images=len(split),
        torch_accuracy=fp32_file.verification.torch_accuracy,
        files=tuple(files),
    )
    if failures:
        raise VerificationError("\n".join(failures), report)
    return report


def _validate_options(
    variants: Iterable[str], verify_images: int, batch_size: int
) -> tuple[str, ...]:
    variants = tuple(dict.fromkeys(variants))  # drop repeats, keep the order
    invalid = [name for name in variants if name not in PRECISIONS[1:]]
    if invalid:
        raise ExportError(
            f"invalid variant {invalid[0]!r}; expected any of {PRECISIONS[1:]}"
        )
    if verify_images < 0:
        raise ExportError(f"verify_images must be >= 0, got {verify_images}")
    if batch_size < 1:
        raise ExportError(f"batch_size must be at least 1, got {batch_size}")
    return variants


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_test_split(
    dataset: DatasetInfo, data_root: str | os.PathLike | None, count: int
) -> ImageSplit:
    """Load the first ``count`` test images (0: all) of the checkpoint's dataset."""
    split, loaded = load_dataset(dataset.name, data_root, train=False)
    if loaded.image_shape != dataset.image_shape or len(loaded.class_names) != len(
        dataset.class_names
    ):
        raise ExportError(
            f"the {dataset.name} test data has images {loaded.image_shape} and "
            f"{len(loaded.class_names)} classes; the checkpoint expects "
            f"{dataset.image_shape} and {len(dataset.class_names)}"
        )
    return split.subset(count)


def _write_verified(
    model: onnx.ModelProto,
    precision: str,
    path: Path,
    context: _ExportContext,
    fp32_file: ExportedFile | None = None,
) -> ExportedFile:
    """Check and verify ``model``, add its metadata and move it to ``path``."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"the {precision} model is invalid ONNX: {error}") from error
    check_contract(model, context.trained.dataset)
    temporary = _create_temporary_file(path)
    try:
        onnx.save(model, temporary)
        probabilities = onnx_probabilities(
            _load_session(temporary, precision),
            context.split.images,
            context.batch_size,
            f"verify: onnxruntime {precision}",
        )
        result = _check_result(precision, probabilities, context)
        metadata = build_metadata(
            context.trained, precision, result, context.checkpoint_sha256
        )
        _add_metadata(model, metadata, temporary, probabilities, context)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)

    size = path.stat().st_size
    drop = 0.0
    if fp32_file is not None:
        drop = fp32_file.verification.accuracy - result.accuracy
    logger.info("wrote %s (%s, %.1f MB)", path, precision, size / 1e6)
    return ExportedFile(path, precision, size, result, drop)


def _create_temporary_file(path: Path) -> Path:
    """Create an empty file beside ``path`` with the default permissions.

    tempfile.mkstemp would make the file readable by its owner only, and the
    rename would carry that mode over to the model file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    temporary.open("xb").close()
    return temporary


def _load_session(path: Path, precision: str) -> ort.InferenceSession:
    try:
        return create_session(path)
    except Exception as error:  # onnxruntime raises its own exception types
        raise ExportError(
            f"onnxruntime failed to load the {precision} model: {error}"
        ) from error


def _check_result(
    precision: str, probabilities: np.ndarray, context: _ExportContext
) -> VerificationResult:
    labels = context.split.labels.numpy()
    result = compare(precision, probabilities, context.probabilities, labels)
    logger.info("%s on %d test images: %s", precision, result.images, result.describe())
    failures = result.failures()
    if failures:
        raise VerificationError(
            f"{precision} export failed verification on {result.images} test "
            f"images: {'; '.join(failures)}. Measured: {result.describe()}"
        )
    return result


def build_metadata(
    trained: TrainedModel,
    precision: str,
    result: VerificationResult,
    checkpoint_sha256: str,
) -> ModelMetadata:
    config = trained.model.config
    channels, height, width = trained.dataset.image_shape
    return ModelMetadata(
        class_names=tuple(trained.dataset.class_names),
        dataset=trained.dataset.name,
        variant=config.variant,
        num_steps=config.num_steps,
        input_height=height,
        input_width=width,
        input_channels=channels,
        label_embedding=config.embedding,
        precision=precision,
        test_accuracy=result.accuracy,
        test_images=result.images,
        checkpoint_sha256=checkpoint_sha256,
        exporter_version=EXPORTER_VERSION,
    )


def _add_metadata(
    model: onnx.ModelProto,
    metadata: ModelMetadata,
    temporary: Path,
    verified: np.ndarray,
    context: _ExportContext,
) -> None:
    """Rewrite the verified file with its metadata and check the result.

    Metadata leaves the graph unchanged, so the first batch must give exactly
    the outputs that verification saw.
    """
    final = onnx.ModelProto()
    final.CopyFrom(model)
    write_metadata(final, metadata)
    onnx.save(final, temporary)

    onnx.checker.check_model(temporary, full_check=True)
    if read_metadata(onnx.load(temporary)) != metadata:
        raise ExportError(
            f"metadata read back from {temporary} differs from the metadata written"
        )
    first_batch = context.split.images[: context.batch_size]
    outputs = onnx_probabilities(create_session(temporary), first_batch)
    if not np.array_equal(outputs, verified[: len(first_batch)]):
        raise ExportError(
            f"{temporary} changed its outputs when the metadata was added"
        )
