"""Fixtures for the service tests: models, real MNIST images, apps and servers."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from PIL import Image

from service.app import create_app
from service.settings import DEFAULT_MODEL_PATH, Settings

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_DIGITS = REPOSITORY_ROOT / "examples" / "digits"
MNIST_TEST_IMAGES = 1000
TINY_MODEL_TIMEOUT_S = 1200
SERVER_START_TIMEOUT_S = 120
READY_TIMEOUT_S = 120

# A small NoProp-DT model, trained and exported in a subprocess (torch stays out
# of the test process) while the default model is absent.
TRAIN_TINY_MODEL = """
import sys
from training.trainer import TrainConfig, Trainer
config = TrainConfig(
    dataset="mnist", epochs=1, num_steps=2, train_subset=640, test_subset=200,
    train_eval_size=200,
)
Trainer(config, sys.argv[1], sys.argv[2]).run()
"""


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a uint8 (H, W) or (H, W, C) array as PNG."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def example_digits() -> list[tuple[Path, int]]:
    """The committed example digits with their labels, from the file names."""
    paths = sorted(EXAMPLE_DIGITS.glob("mnist-test-*-label-*.png"))
    return [(path, int(path.stem.rsplit("-", 1)[1])) for path in paths]


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The repository's default model; skips the test while the file is absent."""
    if not DEFAULT_MODEL_PATH.is_file():
        pytest.skip(
            f"{DEFAULT_MODEL_PATH.relative_to(REPOSITORY_ROOT)} is absent; this test "
            "needs the repository's trained default model"
        )
    return DEFAULT_MODEL_PATH


@pytest.fixture(scope="session")
def model_path(request: pytest.FixtureRequest) -> Path:
    """The default model when present, else a tiny model trained for the tests.

    The tiny model is cached in pytest's cache folder between runs; run pytest
    with --cache-clear after changing training/ or export/.
    """
    if DEFAULT_MODEL_PATH.is_file():
        return DEFAULT_MODEL_PATH
    data_root = request.getfixturevalue("data_root")
    folder = request.config.cache.mkdir("noprop-service-tiny-model")
    model = folder / "model.onnx"
    if not model.is_file():
        _build_tiny_model(folder, data_root)
    return model


def _build_tiny_model(folder: Path, data_root: Path) -> None:
    python = sys.executable
    commands = [
        [python, "-c", TRAIN_TINY_MODEL, str(folder), str(data_root)],
        [
            python,
            "-m",
            "export",
            str(folder / "checkpoint.pt"),
            "-o",
            str(folder / "model.onnx"),
            "--data-root",
            str(data_root),
            "--verify-images",
            "200",
        ],
    ]
    for command in commands:
        result = subprocess.run(
            command,
            cwd=REPOSITORY_ROOT,
            capture_output=True,
            text=True,
            timeout=TINY_MODEL_TIMEOUT_S,
        )
        if result.returncode != 0:
            pytest.fail(f"{command[1:3]} failed:\n{result.stderr[-3000:]}")


@dataclass(frozen=True)
class MnistTest:
    images: np.ndarray  # (N, 28, 28) uint8
    labels: np.ndarray  # (N,) int64


@pytest.fixture(scope="session")
def mnist_test(data_root: Path) -> MnistTest:
    """The first 1,000 real MNIST test images, read from the raw IDX files."""
    raw = data_root / "MNIST" / "raw"
    images = np.fromfile(raw / "t10k-images-idx3-ubyte", dtype=np.uint8, offset=16)
    labels = np.fromfile(raw / "t10k-labels-idx1-ubyte", dtype=np.uint8, offset=8)
    images = images.reshape(-1, 28, 28)[:MNIST_TEST_IMAGES]
    return MnistTest(images, labels[:MNIST_TEST_IMAGES].astype(np.int64))


def make_settings(model: Path, **overrides) -> Settings:
    """Settings for a test app: small batches keep the warm-up short."""
    values = {"model_path": model, "max_batch_size": 4, **overrides}
    return Settings(**values)


@asynccontextmanager
async def running_app(
    settings: Settings,
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """Run the app's lifespan and yield it with an in-process HTTP client."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://127.0.0.1", timeout=30
        ) as client:
            yield app, client


async def wait_ready(client: httpx.AsyncClient, timeout: float = READY_TIMEOUT_S):
    """Poll /readyz until 200; return the last response."""
    deadline = time.monotonic() + timeout
    while True:
        response = await client.get("/readyz")
        if response.status_code == 200 or time.monotonic() > deadline:
            return response
        if response.json()["status"] == "failed":
            return response
        await asyncio.sleep(0.05)


def run_async(coroutine, timeout: float = 180):
    """Run a test coroutine with a time limit, so that no test can hang."""

    async def limited():
        async with asyncio.timeout(timeout):
            return await coroutine

    return asyncio.run(limited())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python -m service`` in a subprocess on 127.0.0.1 and a free port."""

    def __init__(self, model: Path, log_path: Path, **settings: object) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "NOPROP_MODEL_PATH": str(model),
            "NOPROP_HOST": "127.0.0.1",
            "NOPROP_PORT": str(self.port),
        }
        env.update(
            {f"NOPROP_{key.upper()}": str(value) for key, value in settings.items()}
        )
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service"],
            cwd=REPOSITORY_ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_listening(self, timeout: float = SERVER_START_TIMEOUT_S) -> None:
        """Wait until /healthz responds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.log()}")
            try:
                httpx.get(f"{self.url}/healthz", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise AssertionError(f"server did not listen within {timeout} s:\n{self.log()}")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                return
            time.sleep(0.05)
        raise AssertionError(f"server not ready within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self, timeout: float = 30) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


def start_default_server(log_path: Path, **settings: object) -> ServerProcess:
    """Start ``python -m service`` on the default model and wait until it is ready.

    Skips the test when the default model is absent.
    """
    if not DEFAULT_MODEL_PATH.is_file():
        pytest.skip(f"the default model {DEFAULT_MODEL_PATH} is absent")
    process = ServerProcess(DEFAULT_MODEL_PATH, log_path, **settings)
    try:
        process.wait_listening()
        process.wait_ready()
    except BaseException:
        process.stop()
        raise
    return process


@pytest.fixture(scope="module")
def server(
    model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A ready server for the batching and end-to-end tests of one module."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    process = ServerProcess(
        model_path, log_path, max_batch_size=8, max_queue_delay_ms=200
    )
    try:
        process.wait_listening()
        process.wait_ready()
        yield process
    finally:
        process.stop()
