"""The service on the shipped MNIST models of NoProp-DT, -CT and -FM, over HTTP."""

from __future__ import annotations

import httpx
import pytest

from tests.service.conftest import (
    REPOSITORY_ROOT,
    MnistTest,
    ServerProcess,
    example_digits,
    png_bytes,
)

# Each model's accuracy on the whole MNIST test set, measured by the exporter on
# the ONNX file and stored in its metadata, must reach these.
MODELS = {
    "mnist-dt-onehot": ("dt", 0.99),
    "mnist-ct-onehot": ("ct", 0.985),
    "mnist-fm-onehot": ("fm", 0.99),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def variant_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
):
    path = REPOSITORY_ROOT / "models" / request.param / "model.onnx"
    assert path.is_file(), f"{path} is missing"
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    server = ServerProcess(path, log_path, max_batch_size=32)
    try:
        server.wait_listening()
        server.wait_ready()
        yield request.param, server
    finally:
        server.stop()


def test_model_metadata_meets_accuracy(variant_server) -> None:
    name, server = variant_server
    variant, accuracy = MODELS[name]

    metadata = httpx.get(f"{server.url}/model", timeout=10).json()["metadata"]

    assert metadata["noprop.variant"] == variant
    assert metadata["noprop.dataset"] == "mnist"
    assert int(metadata["noprop.test_images"]) == 10_000
    assert float(metadata["noprop.test_accuracy"]) >= accuracy


def test_example_digits_classified(variant_server) -> None:
    _, server = variant_server
    digits = example_digits()

    files = [
        ("images", (path.name, path.read_bytes(), "image/png")) for path, _ in digits
    ]
    response = httpx.post(f"{server.url}/classify", files=files, timeout=60)

    assert response.status_code == 200, response.text
    predicted = [int(p["top_k"][0]["label"]) for p in response.json()["predictions"]]
    assert predicted == [label for _, label in digits]


def test_mnist_test_images_classified(variant_server, mnist_test: MnistTest) -> None:
    """500 real MNIST test images in batches of 50, as multipart uploads."""
    _, server = variant_server
    images, labels = mnist_test.images[:500], mnist_test.labels[:500]

    predicted: list[int] = []
    with httpx.Client(timeout=60) as client:
        for start in range(0, len(images), 50):
            files = [
                ("images", (f"{start + i}.png", png_bytes(image), "image/png"))
                for i, image in enumerate(images[start : start + 50])
            ]
            response = client.post(f"{server.url}/classify", files=files)
            assert response.status_code == 200, response.text
            predictions = response.json()["predictions"]
            predicted += [int(p["top_k"][0]["label"]) for p in predictions]

    correct = sum(int(p == y) for p, y in zip(predicted, labels, strict=True))
    # Every model scores at least 98.5% on the whole test set.
    assert correct >= 490, f"{correct}/500 correct"
