"""Single-file checkpoints: weights, optimizer, config, data description, metrics.

A checkpoint is a ``torch.save`` archive that holds only tensors and plain
Python values, so ``torch.load(weights_only=True)`` reads it without unpickling
arbitrary objects. Files are written to a temporary name and renamed, so a run
killed mid-write leaves the previous checkpoint intact, plus a partial file that
``remove_partial_checkpoints`` deletes.
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "noprop-checkpoint"
CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("format", "version", "model_config", "dataset", "model_state")


class CheckpointError(Exception):
    """A checkpoint is missing, truncated or not a NoProp checkpoint."""


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "torch": str(torch.__version__)}
    for package in ("noprop-serve", "torchvision"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def save_checkpoint(path: str | os.PathLike, contents: dict[str, Any]) -> Path:
    """Write ``contents`` plus the format header atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "versions": package_versions(),
        **contents,
    }
    handle, temporary = tempfile.mkstemp(prefix=partial_prefix(path), dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # mkstemp creates files readable by the owner only
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def partial_prefix(path: Path) -> str:
    """Name prefix of the temporary files that ``save_checkpoint`` writes."""
    return f".{path.name}."


def fsync_directory(folder: Path) -> None:
    """Flush a rename in ``folder`` to disk, so that it survives a power loss."""
    if os.name != "posix":
        return
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def remove_partial_checkpoints(path: str | os.PathLike) -> list[Path]:
    """Delete temporary files that writers of ``path`` left when they were killed.

    Call this only while no other process writes ``path``, because it would
    delete that writer's temporary file.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    prefix = partial_prefix(path)
    removed = sorted(
        entry for entry in path.parent.iterdir() if entry.name.startswith(prefix)
    )
    for partial in removed:
        partial.unlink(missing_ok=True)
        logger.warning(
            "removed %s, a partial checkpoint left by a run killed while writing it",
            partial,
        )
    return removed


def load_checkpoint(
    path: str | os.PathLike, map_location: str = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``, checking its header."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt "
            f"({path.stat().st_size} bytes): {error}"
        ) from error
    except Exception as error:  # weights_only rejects pickled objects with many kinds
        raise CheckpointError(
            f"{path} is not a NoProp checkpoint (it could not be read with "
            f"weights_only=True): {error}"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a NoProp checkpoint: it has no '{CHECKPOINT_FORMAT}' header"
        )
    if payload["version"] != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {payload['version']}; "
            f"this code reads version {CHECKPOINT_VERSION}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"{path} is incomplete: it lacks {', '.join(missing)}")
    return payload
