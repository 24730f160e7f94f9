"""Fixtures for the hardening tests: a real server on the default model."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.service.conftest import ServerProcess, start_default_server

# Small limits, so that the tests reach them with small files.
MAX_IMAGE_PIXELS = 512 * 512
MAX_UPLOAD_BYTES = 2 * 1024 * 1024
BODY_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def hardened_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    process = start_default_server(
        tmp_path_factory.mktemp("hardened") / "server.log",
        max_image_pixels=MAX_IMAGE_PIXELS,
        max_upload_bytes=MAX_UPLOAD_BYTES,
        body_timeout_s=BODY_TIMEOUT_S,
        max_batch_size=8,
    )
    yield process
    process.stop()
