"""Fixtures for the hardening tests: a real server on the default model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.settings import DEFAULT_MODEL_PATH
from tests.service.conftest import ServerProcess

# Small limits, so that the tests reach them with small files.
MAX_IMAGE_PIXELS = 512 * 512
MAX_UPLOAD_BYTES = 2 * 1024 * 1024
BODY_TIMEOUT_S = 2.0


def start_server(log_dir: Path, **settings: object) -> ServerProcess:
    """Start ``python -m service`` on the default model and wait until it is ready."""
    if not DEFAULT_MODEL_PATH.is_file():
        pytest.skip(f"the default model {DEFAULT_MODEL_PATH} is absent")
    process = ServerProcess(DEFAULT_MODEL_PATH, log_dir / "server.log", **settings)
    try:
        process.wait_listening()
        process.wait_ready()
    except BaseException:
        process.stop()
        raise
    return process


@pytest.fixture(scope="module")
def hardened_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    process = start_server(
        tmp_path_factory.mktemp("hardened"),
        max_image_pixels=MAX_IMAGE_PIXELS,
        max_upload_bytes=MAX_UPLOAD_BYTES,
        body_timeout_s=BODY_TIMEOUT_S,
        max_batch_size=8,
    )
    yield process
    process.stop()
