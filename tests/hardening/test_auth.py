"""Optional API-key authentication of /classify on a real server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.cli import EXIT_INVALID_SETTINGS
from tests.service.conftest import (
    EXAMPLE_DIGITS,
    REPOSITORY_ROOT,
    ServerProcess,
    start_default_server,
)

API_KEY = "test-key-" + "5f3a9c2e7b1d4068"
DIGIT_7 = EXAMPLE_DIGITS / "mnist-test-00000-label-7.png"
BOMB = Path(__file__).resolve().parent / "inputs" / "bomb-100000x100000.png"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_default_server(
        tmp_path_factory.mktemp("auth") / "server.log",
        api_key=API_KEY,
        max_batch_size=4,
    )
    yield process
    process.stop()


def _classify(server: ServerProcess, headers: dict[str, str], path: Path = DIGIT_7):
    return httpx.post(
        f"{server.url}/classify",
        content=path.read_bytes(),
        headers={"Content-Type": "image/png", **headers},
        timeout=30,
    )


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-API-Key": "wrong-key-0000000000"},
        {"X-API-Key": API_KEY[:-1]},
        {"X-API-Key": API_KEY + "x"},
        {"Authorization": "Bearer wrong-key-0000000000"},
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": API_KEY},
    ],
    ids=["none", "wrong", "prefix", "longer", "wrong-bearer", "basic", "no-scheme"],
)
def test_rejects_missing_or_wrong_key(keyed_server, headers) -> None:
    response = _classify(keyed_server, headers)
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "headers",
    [{"X-API-Key": API_KEY}, {"Authorization": f"Bearer {API_KEY}"}],
    ids=["header", "bearer"],
)
def test_accepts_right_key(keyed_server, headers) -> None:
    response = _classify(keyed_server, headers)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["top_k"][0]["label"] == "7"


def test_checked_before_decoding(keyed_server) -> None:
    """A decompression bomb without the key gets 401, not 413: it is never opened."""
    response = _classify(keyed_server, {}, BOMB)
    assert response.status_code == 401


def test_probes_stay_open(keyed_server) -> None:
    assert httpx.get(f"{keyed_server.url}/healthz", timeout=10).status_code == 200
    assert httpx.get(f"{keyed_server.url}/readyz", timeout=10).status_code == 200


def test_key_never_logged(keyed_server) -> None:
    _classify(keyed_server, {"X-API-Key": API_KEY})
    _classify(keyed_server, {"X-API-Key": "wrong-key-0000000000"})
    log = keyed_server.log()
    assert "api_key" in log  # the settings line is there, masked
    assert API_KEY not in log
    assert "wrong-key" not in log


def test_short_key_rejected_at_start() -> None:
    env = {**os.environ, "NOPROP_API_KEY": "sh0rt-secret"}
    result = subprocess.run(
        [sys.executable, "-m", "service"],
        cwd=REPOSITORY_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == EXIT_INVALID_SETTINGS
    assert "NOPROP_API_KEY" in result.stderr
    assert "12 characters; use at least 16" in result.stderr
    assert "sh0rt-secret" not in result.stderr


def test_empty_key_means_no_authentication() -> None:
    from service.settings import Settings

    assert Settings(api_key="").api_key is None
