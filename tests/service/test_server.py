"""The real server: ``python -m service`` under uvicorn on 127.0.0.1, over HTTP."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
from prometheus_client.parser import text_string_to_metric_families

from tests.service.conftest import MnistTest, ServerProcess, png_bytes

CLIENT_TIMEOUT_S = 60
CONCURRENT_CLIENTS = 12
HTTP_BATCH = 50  # images per request in the accuracy test
# Batches of different sizes may round differently in the last float32 bits.
BATCH_TOLERANCE = 1e-5


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Return every sample of /metrics by name and sorted labels."""
    text = httpx.get(f"{url}/metrics", timeout=CLIENT_TIMEOUT_S).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def classify_png(client: httpx.Client, url: str, data: bytes) -> httpx.Response:
    return client.post(
        f"{url}/classify", content=data, headers={"Content-Type": "image/png"}
    )


def probabilities_of(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    rows = [list(p["probabilities"].values()) for p in response.json()["predictions"]]
    return np.array(rows)


def test_concurrent_clients_batched(server: ServerProcess, mnist_test: MnistTest):
    images = [png_bytes(image) for image in mnist_test.images[:CONCURRENT_CLIENTS]]
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
        singles = [
            probabilities_of(classify_png(client, server.url, data)) for data in images
        ]

    before = scrape(server.url)
    barrier = threading.Barrier(CONCURRENT_CLIENTS, timeout=CLIENT_TIMEOUT_S)

    def one_client(data: bytes) -> httpx.Response:
        with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
            barrier.wait()
            return classify_png(client, server.url, data)

    with ThreadPoolExecutor(max_workers=CONCURRENT_CLIENTS) as pool:
        responses = list(pool.map(one_client, images))
    after = scrape(server.url)

    for response, single in zip(responses, singles, strict=True):
        np.testing.assert_allclose(
            probabilities_of(response), single, atol=BATCH_TOLERANCE
        )
    batches = (
        after[("noprop_batch_size_count", ())] - before[("noprop_batch_size_count", ())]
    )
    images_run = (
        after[("noprop_batch_size_sum", ())] - before[("noprop_batch_size_sum", ())]
    )
    assert images_run == CONCURRENT_CLIENTS
    assert batches < CONCURRENT_CLIENTS  # at least one batch held several requests
    single_batches = ("noprop_batch_size_bucket", (("le", "1.0"),))
    assert after[single_batches] - before[single_batches] < CONCURRENT_CLIENTS


def test_http_accuracy_matches_offline(
    default_model: Path, server: ServerProcess, mnist_test: MnistTest
):
    """Accuracy over HTTP on 1,000 real test images equals onnxruntime's offline."""
    session = ort.InferenceSession(
        str(default_model), providers=["CPUExecutionProvider"]
    )
    offline = np.concatenate(
        [
            session.run(
                None, {"image": mnist_test.images[start : start + 100, :, :, None]}
            )[0]
            for start in range(0, len(mnist_test.images), 100)
        ]
    ).argmax(1)

    served = []
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
        for start in range(0, len(mnist_test.images), HTTP_BATCH):
            chunk = mnist_test.images[start : start + HTTP_BATCH]
            files = [
                ("images", (f"{start + i}.png", png_bytes(image), "image/png"))
                for i, image in enumerate(chunk)
            ]
            response = client.post(f"{server.url}/classify", files=files)
            assert response.status_code == 200, response.text
            for prediction in response.json()["predictions"]:
                served.append(int(prediction["top_k"][0]["label"]))
    served = np.array(served)

    labels = mnist_test.labels
    assert len(served) == len(labels) == 1000
    http_accuracy = (served == labels).mean()
    offline_accuracy = (offline == labels).mean()
    assert http_accuracy == offline_accuracy
    assert (served == offline).all()
    assert offline_accuracy > 0.9  # the default model is trained


def test_server_drains_on_sigterm(
    model_path: Path, mnist_test: MnistTest, tmp_path: Path
):
    """The server listens before the model is ready. On SIGTERM readiness turns
    503 and the requests in flight complete before the process exits."""
    server = ServerProcess(
        model_path,
        tmp_path / "server.log",
        max_batch_size=8,
        max_queue_delay_ms=2000,
        drain_delay_s=0,
    )
    try:
        server.wait_listening()
        starting = httpx.get(f"{server.url}/readyz", timeout=CLIENT_TIMEOUT_S)
        server.wait_ready()

        pixels = mnist_test.images[:4]
        images = [png_bytes(image) for image in pixels]

        def one_client(data: bytes) -> httpx.Response:
            with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
                return classify_png(client, server.url, data)

        with ThreadPoolExecutor(max_workers=len(images)) as pool:
            in_flight = [pool.submit(one_client, data) for data in images]
            deadline = time.monotonic() + CLIENT_TIMEOUT_S
            while scrape(server.url)[("noprop_queue_depth", ())] < len(images):
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.02)

            server.process.send_signal(signal.SIGTERM)
            with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
                draining = client.get(f"{server.url}/readyz")
                late = classify_png(client, server.url, images[0])
            responses = [future.result(CLIENT_TIMEOUT_S) for future in in_flight]
        returncode = server.process.wait(CLIENT_TIMEOUT_S)
    finally:
        server.stop()

    # The model loads after uvicorn listens, so /readyz is 503 until then. The
    # first probe may still come too late to see it with a small model.
    if starting.status_code != 200:
        assert starting.status_code == 503
        assert starting.json()["status"] == "starting"
    log = server.log_path.read_text()
    assert log.index("Uvicorn running on") < log.index("INFO service.state ready")
    assert draining.status_code == 503
    assert draining.json()["status"] == "draining"
    assert late.status_code == 503
    assert late.json()["error"]["code"] == "shutting_down"
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"image": pixels[:, :, :, None]})
    served = np.concatenate([probabilities_of(response) for response in responses])
    np.testing.assert_allclose(served, expected, atol=BATCH_TOLERANCE)
    # uvicorn re-raises the captured SIGTERM after a graceful shutdown.
    assert returncode == -signal.SIGTERM
    assert "received SIGTERM; draining" in log
    assert "shutdown complete" in log
