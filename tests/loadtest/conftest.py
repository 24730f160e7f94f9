"""Fixtures for the load test tests: the real service on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.settings import DEFAULT_MODEL_PATH
from tests.service.conftest import ServerProcess


def start_server(log_path: Path, **settings: object) -> ServerProcess:
    """Start ``python -m service`` with the default model and wait until ready."""
    if not DEFAULT_MODEL_PATH.is_file():
        pytest.skip(f"{DEFAULT_MODEL_PATH} is absent; the smoke run needs it")
    server = ServerProcess(DEFAULT_MODEL_PATH, log_path, **settings)
    try:
        server.wait_listening()
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The service with its default settings."""
    process = start_server(tmp_path_factory.mktemp("server") / "server.log")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The service with room for one queued image, so that load gets 429."""
    process = start_server(
        tmp_path_factory.mktemp("busy-server") / "server.log",
        max_queue_size=1,
        max_images_per_request=1,
        max_queue_delay_ms=50,
    )
    yield process
    process.stop()
