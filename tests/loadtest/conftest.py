"""Fixtures for the load test tests: the real service on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.service.conftest import ServerProcess, start_default_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The service with its default settings."""
    process = start_default_server(tmp_path_factory.mktemp("server") / "server.log")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The service with room for one queued image, so that load gets 429."""
    process = start_default_server(
        tmp_path_factory.mktemp("busy-server") / "server.log",
        max_queue_size=1,
        max_images_per_request=1,
        max_queue_delay_ms=50,
    )
    yield process
    process.stop()
