"""The HTTP API in process: input forms, responses, errors and status endpoints.

Runs against the default model when present, else against the tiny test model.
"""

from __future__ import annotations

import base64
import io
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from tests.service.conftest import READY_TIMEOUT_S, example_digits, make_settings

MAX_IMAGES = 8
MAX_UPLOAD_BYTES = 200_000
MAX_PIXELS = 1_000_000
# Batches of different sizes may round differently in the last float32 bits.
BATCH_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def client(model_path: Path) -> Iterator[TestClient]:
    settings = make_settings(
        model_path,
        max_images_per_request=MAX_IMAGES,
        max_upload_bytes=MAX_UPLOAD_BYTES,
        max_image_pixels=MAX_PIXELS,
    )
    with TestClient(create_app(settings)) as test_client:
        wait_until_ready(test_client)
        yield test_client


def wait_until_ready(client: TestClient) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json()
        time.sleep(0.05)


@pytest.fixture(scope="module")
def class_names(client: TestClient) -> list[str]:
    return client.get("/model").json()["classes"]


def digit_path(label: int) -> Path:
    return next(path for path, digit in example_digits() if digit == label)


def encode(path: Path, format: str) -> bytes:
    buffer = io.BytesIO()
    options = {"lossless": True} if format == "WEBP" else {}
    Image.open(path).save(buffer, format=format, **options)
    return buffer.getvalue()


def classify_raw(client: TestClient, data: bytes, media_type="image/png", **params):
    return client.post(
        "/classify", content=data, headers={"Content-Type": media_type}, params=params
    )


def probabilities_of(response) -> np.ndarray:
    rows = [list(p["probabilities"].values()) for p in response.json()["predictions"]]
    return np.array(rows)


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    return body["error"]


def check_prediction(prediction: dict, class_names: list[str], k: int) -> None:
    probabilities = prediction["probabilities"]
    assert list(probabilities) == class_names
    assert math.isclose(sum(probabilities.values()), 1.0, abs_tol=1e-5)
    assert all(0.0 <= value <= 1.0 for value in probabilities.values())
    top = prediction["top_k"]
    assert len(top) == k
    values = [entry["probability"] for entry in top]
    assert values == sorted(values, reverse=True)
    for entry in top:
        assert probabilities[entry["label"]] == entry["probability"]
    assert top[0]["probability"] == max(probabilities.values())


@pytest.mark.parametrize(
    ("media_type", "format"),
    [
        ("image/png", "PNG"),
        ("image/jpeg", "JPEG"),
        ("image/webp", "WEBP"),
        ("image/bmp", "BMP"),
        ("application/octet-stream", "PNG"),
    ],
)
def test_classify_raw_body(client, class_names, media_type, format):
    response = classify_raw(client, encode(digit_path(7), format), media_type)
    assert response.status_code == 200, response.text
    body = response.json()
    model = client.get("/model").json()
    assert body["model"] == model["name"]
    assert body["model_version"] == model["version"]
    assert body["request_id"] == response.headers["x-request-id"]
    assert len(body["predictions"]) == 1
    check_prediction(body["predictions"][0], class_names, k=5)


def test_classify_lossless_formats_agree(client):
    answers = [
        probabilities_of(classify_raw(client, encode(digit_path(3), format)))
        for format in ("PNG", "WEBP", "BMP", "TIFF", "GIF")
    ]
    for answer in answers[1:]:
        np.testing.assert_array_equal(answer, answers[0])


def test_classify_matches_onnxruntime(client, model_path):
    path = digit_path(2)
    response = classify_raw(client, path.read_bytes())
    pixels = np.asarray(Image.open(path))[None, :, :, None]  # (1, 28, 28, 1)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"image": pixels})
    np.testing.assert_allclose(probabilities_of(response), expected, atol=1e-6)


def test_classify_same_image_same_answer(client):
    data = digit_path(5).read_bytes()
    first = probabilities_of(classify_raw(client, data))
    for _ in range(3):
        np.testing.assert_array_equal(
            probabilities_of(classify_raw(client, data)), first
        )


def test_classify_multipart_images(client, class_names):
    digits = example_digits()[:MAX_IMAGES]
    files = [
        ("images", (path.name, path.read_bytes(), "image/png")) for path, _ in digits
    ]
    response = client.post("/classify", files=files, params={"top_k": 3})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["index"] for p in predictions] == list(range(len(digits)))
    assert [p["filename"] for p in predictions] == [path.name for path, _ in digits]
    for prediction, (path, _) in zip(predictions, digits, strict=True):
        check_prediction(prediction, class_names, k=3)
        single = probabilities_of(classify_raw(client, path.read_bytes()))[0]
        values = np.array(list(prediction["probabilities"].values()))
        np.testing.assert_allclose(values, single, atol=BATCH_TOLERANCE)


def test_classify_multipart_single_image_field(client, class_names):
    path = digit_path(1)
    files = {"image": (path.name, path.read_bytes(), "image/png")}
    response = client.post("/classify", files=files)
    assert response.status_code == 200, response.text
    check_prediction(response.json()["predictions"][0], class_names, k=5)


def test_classify_json_base64(client, class_names):
    paths = [digit_path(0), digit_path(9)]
    encoded = [base64.b64encode(path.read_bytes()).decode() for path in paths]
    encoded[1] = "data:image/png;base64," + encoded[1]
    response = client.post("/classify", json={"images": encoded})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 2
    for prediction, path in zip(predictions, paths, strict=True):
        check_prediction(prediction, class_names, k=5)
        single = probabilities_of(classify_raw(client, path.read_bytes()))[0]
        values = np.array(list(prediction["probabilities"].values()))
        np.testing.assert_allclose(values, single, atol=BATCH_TOLERANCE)


def test_classify_converts_size_and_colour(client, class_names):
    digit = Image.open(digit_path(4))
    large_rgba = digit.resize((280, 200)).convert("RGBA")
    buffer = io.BytesIO()
    large_rgba.save(buffer, format="PNG")
    response = classify_raw(client, buffer.getvalue())
    assert response.status_code == 200, response.text
    check_prediction(response.json()["predictions"][0], class_names, k=5)


def test_classify_top_k(client, class_names):
    data = digit_path(6).read_bytes()
    every = classify_raw(client, data, top_k=len(class_names)).json()
    check_prediction(every["predictions"][0], class_names, k=len(class_names))
    top_one = classify_raw(client, data, top_k=1).json()
    check_prediction(top_one["predictions"][0], class_names, k=1)


@pytest.mark.parametrize("top_k", ["0", "11", "two"])
def test_classify_rejects_invalid_top_k(client, top_k):
    response = classify_raw(client, digit_path(6).read_bytes(), top_k=top_k)
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "invalid_request"
    assert "top_k" in error["message"]


def test_classify_known_digits(default_model, client):
    """Each example digit, the first of its class in the MNIST test set, gets
    its label as the top class."""
    for path, label in example_digits():
        response = classify_raw(client, path.read_bytes())
        assert response.status_code == 200, response.text
        top = response.json()["predictions"][0]["top_k"][0]
        assert top["label"] == str(label), path.name


def truncated_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (300, 300), 9).save(buffer, format="PNG", compress_level=0)
    data = buffer.getvalue()
    return data[: len(data) // 2]


def too_many_pixels_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (1001, 1000), 0).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "status", "code", "message"),
    [
        (b"", 400, "invalid_image", "image 0: the image is empty"),
        (b"GIF89a but no more", 400, "invalid_image", "image 0: the data is not"),
        (b"plain text", 400, "invalid_image", "not a readable image"),
        (truncated_png(), 400, "invalid_image", "truncated or corrupt"),
        (too_many_pixels_png(), 413, "image_too_large", "1001x1000 = 1001000 pixels"),
        (b"x" * (MAX_UPLOAD_BYTES + 1), 413, "request_too_large", "200000 bytes"),
    ],
)
def test_classify_rejects_bad_raw_image(client, data, status, code, message):
    response = classify_raw(client, data)
    assert response.status_code == status
    error = error_of(response)
    assert error["code"] == code
    assert message in error["message"]


def test_classify_rejects_oversized_chunked_body(client):
    def chunks():
        for _ in range(MAX_UPLOAD_BYTES // 10_000 + 1):
            yield b"x" * 10_000

    response = client.post(
        "/classify", content=chunks(), headers={"Content-Type": "image/png"}
    )
    assert response.status_code == 413
    assert error_of(response)["code"] == "request_too_large"


def test_classify_rejects_too_many_images(client):
    data = digit_path(8).read_bytes()
    files = [("images", (f"{i}.png", data, "image/png")) for i in range(MAX_IMAGES + 1)]
    response = client.post("/classify", files=files)
    assert response.status_code == 413
    error = error_of(response)
    assert error["code"] == "too_many_images"
    assert f"the maximum is {MAX_IMAGES}" in error["message"]

    encoded = base64.b64encode(data).decode()
    response = client.post("/classify", json={"images": [encoded] * (MAX_IMAGES + 1)})
    assert response.status_code == 413
    assert f"contains {MAX_IMAGES + 1} images" in error_of(response)["message"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"images": ["AAAA"], "image": "AAAA"}, "unknown field 'image'"),
        ({"pictures": ["AAAA"]}, "unknown field 'pictures'"),
        ({"images": []}, "images: List should have at least 1 item"),
        ({"images": "AAAA"}, "images: Input should be a valid array"),
        ({"images": ["not base64!"]}, "images[0] is not valid base64"),
        ({"images": ["data:image/png,raw"]}, "without ';base64,'"),
    ],
)
def test_classify_rejects_bad_json(client, body, message):
    response = client.post("/classify", json=body)
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "invalid_request"
    assert message in error["message"]


def test_classify_rejects_malformed_json(client):
    response = classify_raw(client, b'{"images": [', "application/json")
    assert response.status_code == 400
    assert "not valid JSON" in error_of(response)["message"]


def test_classify_rejects_bad_multipart(client):
    data = digit_path(8).read_bytes()
    unknown = client.post("/classify", files={"picture": ("a.png", data, "image/png")})
    assert unknown.status_code == 400
    assert "unknown multipart field 'picture'" in error_of(unknown)["message"]

    text = client.post(
        "/classify",
        data={"image": "not a file"},
        files={"images": ("a.png", data, "image/png")},
    )
    assert text.status_code == 400
    assert "must be a file upload" in error_of(text)["message"]


@pytest.mark.parametrize("media_type", ["text/plain", None])
def test_classify_rejects_unsupported_media_type(client, media_type):
    headers = {"Content-Type": media_type} if media_type else {}
    response = client.post("/classify", content=b"7", headers=headers)
    assert response.status_code == 415
    error = error_of(response)
    assert error["code"] == "unsupported_media_type"
    assert "multipart/form-data" in error["message"]


def test_service_healthy_after_bad_requests(client):
    for data in (b"", truncated_png(), too_many_pixels_png()):
        classify_raw(client, data)
    assert client.get("/readyz").status_code == 200
    response = classify_raw(client, digit_path(7).read_bytes())
    assert response.status_code == 200


def test_request_id_from_client_kept(client):
    response = client.get("/healthz", headers={"X-Request-ID": "trace-42.a:b"})
    assert response.headers["x-request-id"] == "trace-42.a:b"


@pytest.mark.parametrize("request_id", ["has space", "x" * 129, "semi;colon"])
def test_request_id_invalid_replaced(client, request_id):
    response = client.get("/healthz", headers={"X-Request-ID": request_id})
    assert response.headers["x-request-id"] != request_id
    assert len(response.headers["x-request-id"]) == 32


def test_unknown_path_json_404(client):
    response = client.get("/nothing-here")
    assert response.status_code == 404
    assert error_of(response)["code"] == "not_found"


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "detail": None}


def test_model_describes_model_and_settings(client, model_path):
    model = client.get("/model").json()
    assert model["name"] == model_path.parent.name
    assert len(model["version"]) == 12
    assert model["sha256"].startswith(model["version"])
    assert model["classes"] == [str(digit) for digit in range(10)]
    assert model["input_shape"] == {"height": 28, "width": 28, "channels": 1}
    assert model["execution_providers"][-1] == "CPUExecutionProvider"
    assert model["requested_providers"][0] == "CUDAExecutionProvider"
    assert model["batching"]["max_batch_size"] == 4
    assert model["limits"]["max_images_per_request"] == MAX_IMAGES
    assert model["metadata"]["noprop.dataset"] == "mnist"
    assert model["metadata"]["noprop.input_channels"] == "1"


def test_metrics_prometheus_format(client):
    classify_raw(client, digit_path(7).read_bytes())
    classify_raw(client, b"")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {
        family.name: family for family in text_string_to_metric_families(response.text)
    }
    expected = {
        "noprop_http_requests": "counter",
        "noprop_http_request_duration_seconds": "histogram",
        "noprop_queue_wait_seconds": "histogram",
        "noprop_batch_size": "histogram",
        "noprop_inference_duration_seconds": "histogram",
        "noprop_queue_depth": "gauge",
        "noprop_dropped_images": "counter",
    }
    for name, kind in expected.items():
        assert families[name].type == kind
    statuses = {
        sample.labels["status"]: sample.value
        for sample in families["noprop_http_requests"].samples
        if sample.name == "noprop_http_requests_total"
        and sample.labels["route"] == "/classify"
    }
    assert statuses["200"] >= 1
    assert statuses["400"] >= 1


def test_metrics_label_unknown_method_other(client):
    assert client.request("BREW", "/classify").status_code == 405
    text = client.get("/metrics").text
    assert 'method="other",route="/classify",status="405"' in text
    assert "BREW" not in text


def test_openapi_documents_classify(client):
    schema = client.get("/openapi.json").json()
    operation = schema["paths"]["/classify"]["post"]
    content = operation["requestBody"]["content"]
    for media_type in ("image/png", "image/jpeg", "multipart/form-data"):
        assert media_type in content
    assert "examples" in content["application/json"]
    assert {"200", "400", "413", "429", "504"} <= set(operation["responses"])
    response_schema = schema["components"]["schemas"]["ClassifyResponse"]
    assert response_schema["examples"][0]["predictions"][0]["top_k"]
    assert client.get("/docs").status_code == 200
