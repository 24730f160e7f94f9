"""Hostile and unusual requests against a real server: each gets a defined 4xx
or the correct classification, and no response carries a stack trace.

The image files live in inputs/ and are written by make_inputs.py.
"""

from __future__ import annotations

import io
import json
import socket
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.hardening.conftest import BODY_TIMEOUT_S, MAX_IMAGE_PIXELS, MAX_UPLOAD_BYTES
from tests.service.conftest import EXAMPLE_DIGITS, ServerProcess

INPUTS = Path(__file__).resolve().parent / "inputs"
DIGIT_7 = EXAMPLE_DIGITS / "mnist-test-00000-label-7.png"
CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".tiff": "image/tiff",
    ".ppm": "image/x-portable-pixmap",
    ".eps": "image/x-eps",
}
# File name prefix -> (status, error code); "label-7" files must be classified 7.
EXPECTED_ERRORS = {
    "bomb-": (413, "image_too_large"),
    "truncated-": (400, "invalid_image"),
    "corrupt-": (400, "invalid_image"),
    "not-an-image": (400, "invalid_image"),
}


def _expected(path: Path) -> tuple[int, str | None]:
    if path.name.startswith("label-7"):
        return 200, "7"
    if path.name.startswith("tiny-"):
        return 200, None  # any class, with valid probabilities
    for prefix, expected in EXPECTED_ERRORS.items():
        if path.name.startswith(prefix):
            return expected
    raise AssertionError(f"{path.name} has no expected outcome")


def _check_response(response: httpx.Response, status: int, expected: str | None):
    assert "Traceback" not in response.text
    assert response.status_code == status, response.text
    body = response.json()
    if status == 200:
        (prediction,) = body["predictions"]
        assert sum(prediction["probabilities"].values()) == pytest.approx(1, abs=1e-4)
        if expected is not None:
            assert prediction["top_k"][0]["label"] == expected
    else:
        assert body["error"]["code"] == expected
        assert body["error"]["message"]
        assert body["error"]["request_id"] == response.headers["x-request-id"]


@pytest.mark.parametrize("path", sorted(INPUTS.iterdir()), ids=lambda path: path.name)
def test_input_file_raw_body(hardened_server: ServerProcess, path: Path) -> None:
    status, expected = _expected(path)
    response = httpx.post(
        f"{hardened_server.url}/classify",
        content=path.read_bytes(),
        headers={"Content-Type": CONTENT_TYPES[path.suffix]},
        timeout=30,
    )
    _check_response(response, status, expected)


@pytest.mark.parametrize("path", sorted(INPUTS.iterdir()), ids=lambda path: path.name)
def test_input_file_multipart(hardened_server: ServerProcess, path: Path) -> None:
    status, expected = _expected(path)
    files = [("images", (path.name, path.read_bytes(), "application/octet-stream"))]
    response = httpx.post(f"{hardened_server.url}/classify", files=files, timeout=30)
    _check_response(response, status, expected)


def _upscaled_digit(width: int, height: int) -> bytes:
    image = Image.open(DIGIT_7).convert("L").resize((width, height))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_at_pixel_limit(hardened_server: ServerProcess) -> None:
    side = int(MAX_IMAGE_PIXELS**0.5)
    response = httpx.post(
        f"{hardened_server.url}/classify",
        content=_upscaled_digit(side, side),
        headers={"Content-Type": "image/png"},
        timeout=30,
    )
    _check_response(response, 200, "7")


def test_image_over_pixel_limit(hardened_server: ServerProcess) -> None:
    side = int(MAX_IMAGE_PIXELS**0.5)
    response = httpx.post(
        f"{hardened_server.url}/classify",
        content=_upscaled_digit(side + 1, side),
        headers={"Content-Type": "image/png"},
        timeout=30,
    )
    _check_response(response, 413, "image_too_large")


@pytest.mark.parametrize(
    ("content", "content_type", "status", "code"),
    [
        (b"", "image/png", 400, "invalid_image"),
        (b"", "application/json", 400, "invalid_request"),
        (b"hello", "text/plain", 415, "unsupported_media_type"),
        (b"hello", None, 415, "unsupported_media_type"),
        (b'{"images": []}', "image/png", 400, "invalid_image"),
        (b"\x89PNG", "application/json", 400, "invalid_request"),
        (b"abc", "multipart/form-data", 400, "invalid_request"),
        (b"--x\r\nbroken", "multipart/form-data; boundary=x", 400, "invalid_request"),
    ],
    ids=[
        "empty-image",
        "empty-json",
        "text",
        "no-content-type",
        "json-as-png",
        "png-as-json",
        "multipart-no-boundary",
        "multipart-broken",
    ],
)
def test_wrong_bodies(
    hardened_server: ServerProcess,
    content: bytes,
    content_type: str | None,
    status: int,
    code: str,
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = httpx.post(
        f"{hardened_server.url}/classify", content=content, headers=headers, timeout=30
    )
    _check_response(response, status, code)


DEEP = 100_000


@pytest.mark.parametrize(
    "body",
    [
        b'{"images": 5}',
        b'{"images": "abc"}',
        b'{"images": [1, 2]}',
        b'{"images": [null]}',
        b'{"images": [{"data": "x"}]}',
        b'{"images": ["not base64!"]}',
        b'{"images": ["data:image/png;base64,"]}',
        b'{"images": NaN}',
        b'{"images": [' + b"9" * 5000 + b"]}",
        b'{"images": ' + b"[" * DEEP + b"]" * DEEP + b"}",
        b"[" * DEEP + b"]" * DEEP,
        b'{"images": ["AAAA"], "extra": 1}',
        b'{"images": ["AAAA"]',
        b"\xff\xfe{",
        json.dumps({"images": ["A" * 100] * 65}).encode(),
    ],
    ids=[
        "number",
        "string",
        "numbers",
        "null",
        "objects",
        "bad-base64",
        "empty-data-url",
        "nan",
        "huge-number",
        "deep-nesting",
        "deep-array",
        "unknown-field",
        "unterminated",
        "not-utf8",
        "too-many-images",
    ],
)
def test_hostile_json(hardened_server: ServerProcess, body: bytes) -> None:
    response = httpx.post(
        f"{hardened_server.url}/classify",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert "Traceback" not in response.text
    assert response.status_code in (400, 413), response.text
    assert response.json()["error"]["code"] in (
        "invalid_request",
        "invalid_image",
        "too_many_images",
    )


def test_body_over_upload_limit(hardened_server: ServerProcess) -> None:
    response = httpx.post(
        f"{hardened_server.url}/classify",
        content=b"\0" * (MAX_UPLOAD_BYTES + 1),
        headers={"Content-Type": "image/png"},
        timeout=30,
    )
    _check_response(response, 413, "request_too_large")


def test_slow_upload_is_answered(hardened_server: ServerProcess) -> None:
    """An upload that trickles in, but within the body timeout, is classified."""
    data = DIGIT_7.read_bytes()
    pieces = [data[i : i + 64] for i in range(0, len(data), 64)]
    pause = BODY_TIMEOUT_S / 2 / len(pieces)

    def trickle():
        for piece in pieces:
            time.sleep(pause)
            yield piece

    response = httpx.post(
        f"{hardened_server.url}/classify",
        content=trickle(),
        headers={"Content-Type": "image/png", "Content-Length": str(len(data))},
        timeout=30,
    )
    _check_response(response, 200, "7")


def test_stalled_upload_gets_408(hardened_server: ServerProcess) -> None:
    """A body that stops arriving gets 408 after the body timeout, not a hang."""
    data = DIGIT_7.read_bytes()
    with socket.create_connection(("127.0.0.1", hardened_server.port)) as client:
        client.sendall(
            b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: image/png\r\nContent-Length: %d\r\n\r\n" % len(data)
        )
        client.sendall(data[:50])
        start = time.monotonic()
        client.settimeout(BODY_TIMEOUT_S * 5)
        reply = client.recv(4096)
        waited = time.monotonic() - start
        while b'"request_timeout"' not in reply and (more := client.recv(4096)):
            reply += more
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b'"request_timeout"' in reply, reply
    assert waited < BODY_TIMEOUT_S * 3


def test_server_survives(hardened_server: ServerProcess) -> None:
    """After every hostile request above, the server still classifies correctly."""
    assert hardened_server.process.poll() is None, hardened_server.log()[-2000:]
    response = httpx.post(
        f"{hardened_server.url}/classify",
        content=DIGIT_7.read_bytes(),
        headers={"Content-Type": "image/png"},
        timeout=30,
    )
    _check_response(response, 200, "7")
    assert "Traceback" not in hardened_server.log()
