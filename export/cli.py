"""Command line: ``python -m export`` or ``noprop-export``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from export.errors import ExportError, VerificationError
from export.exporter import export_checkpoint, variant_path
from export.graph import DEFAULT_OPSET, MIN_OPSET
from export.verification import DEFAULT_BATCH_SIZE, TOLERANCES
from training.checkpoint import CheckpointError
from training.continuous import DEFAULT_INTEGRATION
from training.data import DATA_ROOT_ENV, DatasetError
from training.model import SOLVERS

EXIT_VERIFICATION_FAILED = 1
EXIT_INVALID_INPUT = 2

EPILOG = f"""\
The exported graph takes uint8 images [batch, height, width, channels] as
"image" and returns float32 "probabilities" [batch, num_classes]. Each file is
checked with onnx.checker and compared with the PyTorch model under
onnxruntime on the test split of the checkpoint's dataset. A file that fails
is not written.

Bounds against PyTorch (max |difference of probabilities|, accuracy gap):
  fp32  below {TOLERANCES["fp32"].max_abs_diff:g}, \
{100 * TOLERANCES["fp32"].max_accuracy_gap:g} pp, and the same top class for every image
  fp16  below {TOLERANCES["fp16"].max_abs_diff:g}, \
{100 * TOLERANCES["fp16"].max_accuracy_gap:g} pp
  int8  below {TOLERANCES["int8"].max_abs_diff:g}, \
{100 * TOLERANCES["int8"].max_accuracy_gap:g} pp

Exit status: 0 when every file passed, {EXIT_VERIFICATION_FAILED} when a file \
failed verification,
{EXIT_INVALID_INPUT} for an invalid option, checkpoint or dataset, or a failed \
export.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a NoProp checkpoint to an ONNX model, verified against "
        "PyTorch on the real test set.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "checkpoint", type=Path, help="checkpoint.pt written by noprop-train"
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="ONNX file to write (default: model.onnx beside the checkpoint)",
    )
    parser.add_argument(
        "--fp16",
        action="store_true",
        help="also write OUTPUT_STEM.fp16.onnx with float16 weights "
        "(half the size; computes in float32)",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also write OUTPUT_STEM.int8.onnx with int8 weights in the fully "
        "connected layers (onnxruntime dynamic quantization)",
    )
    parser.add_argument(
        "--data-root",
        default=None,
        help=f"folder holding the datasets (default: ${DATA_ROOT_ENV})",
    )
    parser.add_argument(
        "--verify-images",
        type=int,
        default=0,
        metavar="N",
        help="verify on the first N test images (default: 0, the whole test split)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"images per batch during verification (default: {DEFAULT_BATCH_SIZE})",
    )
    default_solvers = ", ".join(f"{v} {s}" for v, (s, _) in DEFAULT_INTEGRATION.items())
    default_steps = ", ".join(f"{v} {n}" for v, (_, n) in DEFAULT_INTEGRATION.items())
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"ct and fm models: integration steps to unroll "
        f"(default: {default_steps})",
    )
    parser.add_argument(
        "--solver",
        choices=SOLVERS,
        default=None,
        help=f"ct and fm models: the ODE solver to unroll (default: {default_solvers})",
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset version, at least {MIN_OPSET} (default: {DEFAULT_OPSET})",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    logging.getLogger("export").setLevel(logging.INFO)

    output = args.output or args.checkpoint.parent / "model.onnx"
    variants = [name for name in ("fp16", "int8") if getattr(args, name)]
    try:
        report = export_checkpoint(
            args.checkpoint,
            output,
            variants=variants,
            data_root=args.data_root,
            verify_images=args.verify_images,
            opset=args.opset,
            batch_size=args.batch_size,
            steps=args.steps,
            solver=args.solver,
        )
    except VerificationError as error:
        if error.report is not None:
            print(error.report.summary())
        print(f"error: {error}", file=sys.stderr)
        print(_not_written(output, variants, error.report), file=sys.stderr)
        return EXIT_VERIFICATION_FAILED
    except (CheckpointError, DatasetError, ExportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INVALID_INPUT
    print(report.summary())
    return 0


def _not_written(output: Path, variants: list[str], report) -> str:
    written = {file.path for file in report.files} if report is not None else set()
    targets = [variant_path(output, name) for name in ["fp32", *variants]]
    missing = [str(path) for path in targets if path not in written]
    return f"not written: {', '.join(missing)}"
