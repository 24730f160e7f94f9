"""Readiness, overload, timeouts, failures and disconnects, in process.

A gate in front of the real model session blocks the worker thread, so the
tests control when warm-up and batches finish.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.model import ModelSession
from tests.service.conftest import (
    EXAMPLE_DIGITS,
    make_settings,
    run_async,
    running_app,
    wait_ready,
)

GATE_TIMEOUT_S = 30
POLL_TIMEOUT_S = 30


class Gate:
    """Blocks ModelSession.warm_up and ModelSession.run until opened."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.warm_up_open = threading.Event()
        self.run_open = threading.Event()
        self.warm_up_open.set()
        self.run_open.set()
        self.fail_runs = False
        warm_up = ModelSession.warm_up
        run = ModelSession.run

        def gated_warm_up(session: ModelSession, max_batch_size: int) -> float:
            assert self.warm_up_open.wait(GATE_TIMEOUT_S)
            return warm_up(session, max_batch_size)

        def gated_run(session: ModelSession, images: np.ndarray) -> np.ndarray:
            assert self.run_open.wait(GATE_TIMEOUT_S)
            if self.fail_runs:
                raise RuntimeError("simulated device failure")
            return run(session, images)

        monkeypatch.setattr(ModelSession, "warm_up", gated_warm_up)
        monkeypatch.setattr(ModelSession, "run", gated_run)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Gate:
    return Gate(monkeypatch)


@pytest.fixture
def digit() -> bytes:
    return (EXAMPLE_DIGITS / "mnist-test-00000-label-7.png").read_bytes()


def start_client(model_path: Path, **settings) -> TestClient:
    # Batches of one image keep the warm-up of each test's app to one run.
    settings = {"max_batch_size": 1, **settings}
    return TestClient(create_app(make_settings(model_path, **settings)))


def wait_for(condition, timeout: float = POLL_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def post_digit(client: TestClient, digit: bytes):
    return client.post(
        "/classify", content=digit, headers={"Content-Type": "image/png"}
    )


def metric(client: TestClient, name: str, labels: dict | None = None) -> float:
    registry = client.app.state.service.metrics.registry
    return registry.get_sample_value(name, labels or {}) or 0.0


def test_readiness_during_warm_up(model_path, gate, digit):
    gate.warm_up_open.clear()
    with start_client(model_path) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["status"] == "starting"

        response = post_digit(client, digit)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "not_ready"
        assert response.headers["retry-after"] == "1"
        assert client.get("/model").status_code == 503

        gate.warm_up_open.set()
        wait_for(lambda: client.get("/readyz").status_code == 200)
        assert post_digit(client, digit).status_code == 200


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(),
    reason="this machine has the CUDA execution provider, so CUDA is not missing",
)
def test_cuda_required_without_gpu_not_ready(model_path, digit):
    with start_client(model_path, require_cuda=True) as client:
        wait_for(lambda: client.get("/readyz").json()["status"] != "starting")
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["status"] == "failed"
        assert "NOPROP_REQUIRE_CUDA is set" in ready.json()["detail"]
        assert "CPUExecutionProvider" in ready.json()["detail"]

        response = post_digit(client, digit)
        assert response.status_code == 503
        assert (
            "CUDAExecutionProvider is not active" in response.json()["error"]["message"]
        )
        assert client.get("/healthz").status_code == 200
        providers = client.get("/model").json()["execution_providers"]
        assert "CUDAExecutionProvider" not in providers


def test_queue_full_returns_429(model_path, gate, digit):
    settings = {
        "max_batch_size": 1,
        "max_queue_delay_ms": 0,
        "max_queue_size": 1,
        "max_images_per_request": 1,
    }
    with start_client(model_path, **settings) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200)
        state = client.app.state.service
        gate.run_open.clear()
        with ThreadPoolExecutor(max_workers=2) as pool:
            running = pool.submit(post_digit, client, digit)
            wait_for(lambda: state.in_flight == 1 and state.batcher.queue_depth == 0)
            queued = pool.submit(post_digit, client, digit)
            wait_for(lambda: state.batcher.queue_depth == 1)

            start = time.monotonic()
            rejected = post_digit(client, digit)
            elapsed = time.monotonic() - start
            gate.run_open.set()
            assert running.result(GATE_TIMEOUT_S).status_code == 200
            assert queued.result(GATE_TIMEOUT_S).status_code == 200

    assert rejected.status_code == 429
    assert rejected.headers["retry-after"] == "1"
    error = rejected.json()["error"]
    assert error["code"] == "queue_full"
    assert "room for 0 images" in error["message"]
    assert elapsed < 5  # rejected at once, not after the batch


def test_request_timeout_returns_504(model_path, gate, digit):
    with start_client(model_path, request_timeout_s=0.5) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200)
        gate.run_open.clear()
        start = time.monotonic()
        response = post_digit(client, digit)
        elapsed = time.monotonic() - start
        gate.run_open.set()
        wait_for(lambda: client.app.state.service.batcher.queue_depth == 0)
        after = post_digit(client, digit)

    assert response.status_code == 504
    error = response.json()["error"]
    assert error["code"] == "timeout"
    assert "0.5 s" in error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    assert 0.5 <= elapsed < 5
    assert after.status_code == 200


def test_failed_batch_returns_500(model_path, gate, digit):
    with start_client(model_path) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200)
        gate.fail_runs = True
        response = client.post(
            "/classify",
            content=digit,
            headers={"Content-Type": "image/png", "X-Request-ID": "failing-1"},
        )
        gate.fail_runs = False
        recovered = post_digit(client, digit)
        failed_batches = metric(client, "noprop_failed_batches_total")

    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "inference_failed"
    assert error["request_id"] == "failing-1"
    assert "failing-1" in error["message"]
    assert recovered.status_code == 200
    assert failed_batches == 1


def test_drain_timeout_fails_waiting_requests(model_path, gate, digit):
    with start_client(model_path, shutdown_timeout_s=0.3) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200)
        state = client.app.state.service
        gate.run_open.clear()
        with ThreadPoolExecutor(max_workers=1) as pool:
            waiting = pool.submit(post_digit, client, digit)
            wait_for(lambda: state.in_flight == 1 and state.batcher.queue_depth == 0)
            client.portal.call(state.drain)
            response = waiting.result(GATE_TIMEOUT_S)
            ready = client.get("/readyz")
            late = post_digit(client, digit)
        gate.run_open.set()

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "shutting_down"
    assert ready.status_code == 503
    assert ready.json()["status"] == "draining"
    assert late.status_code == 503


def test_client_disconnect_drops_queued_image(model_path, gate, digit):
    """A client that leaves while its image waits gets its image dropped unrun."""
    settings = make_settings(model_path, max_batch_size=1, max_queue_delay_ms=0)

    async def scenario():
        async with running_app(settings) as (app, client):
            assert (await wait_ready(client)).status_code == 200
            state = app.state.service
            gate.run_open.clear()
            running = asyncio.create_task(
                client.post(
                    "/classify", content=digit, headers={"Content-Type": "image/png"}
                )
            )
            while state.in_flight < 1:
                await asyncio.sleep(0.01)

            disconnected = asyncio.Event()
            sent: list[dict] = []
            leaving = asyncio.create_task(
                app(
                    classify_scope(),
                    receive_then_disconnect(digit, disconnected),
                    capture(sent),
                )
            )
            while state.batcher.queue_depth < 1:
                await asyncio.sleep(0.01)
            disconnected.set()
            await leaving
            gate.run_open.set()
            first = await running

            registry = state.metrics.registry
            dropped = "noprop_dropped_images_total"
            while not registry.get_sample_value(dropped, {"reason": "cancelled"}):
                await asyncio.sleep(0.01)
            return first, sent, registry

    first, sent, registry = run_async(scenario(), timeout=120)
    assert first.status_code == 200
    assert sent[0]["status"] == 499
    assert registry.get_sample_value("noprop_batch_size_count") == 1  # first only
    labels = {"method": "POST", "route": "/classify", "status": "499"}
    assert registry.get_sample_value("noprop_http_requests_total", labels) == 1


def classify_scope() -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/classify",
        "raw_path": b"/classify",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"image/png"), (b"host", b"127.0.0.1")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }


def receive_then_disconnect(body: bytes, disconnected: asyncio.Event):
    """An ASGI receive that delivers the body, then waits for the disconnect."""
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop()
        await disconnected.wait()
        return {"type": "http.disconnect"}

    return receive


def capture(sent: list[dict]):
    async def send(message: dict) -> None:
        sent.append(message)

    return send
