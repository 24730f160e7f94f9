"""Request bodies of every form, and the /classify response shape check."""

from __future__ import annotations

import base64
import copy
import json

import pytest

from loadtest.forms import (
    MULTIPART_BOUNDARY,
    ResponseShapeError,
    build_request,
    check_response,
    parse_forms,
)
from loadtest.images import TestImage

SEVEN = TestImage("mnist-test-00000-label-7.png", b"\x89PNG seven", "7")
TWO = TestImage("mnist-test-00001-label-2.png", b"\x89PNG two", "2")


def prediction(index: int, filename: str | None, best: str) -> dict:
    probabilities = {str(digit): 0.05 for digit in range(10)}
    probabilities[best] = 0.55
    ranked = sorted(probabilities, key=lambda label: -probabilities[label])[:3]
    return {
        "index": index,
        "filename": filename,
        "probabilities": probabilities,
        "top_k": [
            {"label": label, "probability": probabilities[label]} for label in ranked
        ],
    }


def payload(*predictions: dict) -> dict:
    return {
        "model": "mnist-dt-onehot",
        "model_version": "0123456789ab",
        "request_id": "abc",
        "predictions": list(predictions),
    }


def test_build_request_raw_forms():
    raw = build_request("raw", [SEVEN])
    assert raw.body == SEVEN.data
    assert raw.headers == {"Content-Type": "image/png"}
    octet = build_request("octet-stream", [SEVEN])
    assert octet.body == SEVEN.data
    assert octet.headers == {"Content-Type": "application/octet-stream"}


def test_build_request_multipart_fields():
    request = build_request("multipart", [SEVEN, TWO])
    content_type = request.headers["Content-Type"]
    assert content_type == f"multipart/form-data; boundary={MULTIPART_BOUNDARY}"
    assert request.body.count(b'name="images"') == 2
    assert SEVEN.data in request.body
    assert TWO.data in request.body
    assert request.body.endswith(f"--{MULTIPART_BOUNDARY}--\r\n".encode())
    single = build_request("multipart-image", [SEVEN])
    assert single.body.count(b'name="image";') == 1
    assert single.sends_filenames


def test_build_request_json_forms():
    plain = json.loads(build_request("json", [SEVEN, TWO]).body)
    assert [base64.b64decode(text) for text in plain["images"]] == [
        SEVEN.data,
        TWO.data,
    ]
    data_url = json.loads(build_request("data-url", [SEVEN]).body)["images"][0]
    prefix, _, encoded = data_url.partition(",")
    assert prefix == "data:image/png;base64"
    assert base64.b64decode(encoded) == SEVEN.data


def test_build_request_single_forms_reject_two_images():
    for form in ("raw", "octet-stream", "multipart-image"):
        with pytest.raises(ValueError, match="carries one image"):
            build_request(form, [SEVEN, TWO])


def test_parse_forms_rejects_unknown():
    assert parse_forms(" raw , json") == ("raw", "json")
    with pytest.raises(ValueError, match="choose from"):
        parse_forms("raw,xml")
    with pytest.raises(ValueError, match="choose from"):
        parse_forms(" , ")


def test_check_response_counts_correct_labels():
    request = build_request("multipart", [SEVEN, TWO])
    body = payload(prediction(0, SEVEN.filename, "7"), prediction(1, TWO.filename, "3"))
    assert check_response(body, request, top_k=3) == 1


def test_check_response_rejects_wrong_shapes():
    request = build_request("json", [SEVEN])
    valid = payload(prediction(0, None, "7"))
    breakages = {
        "no 'predictions' field": lambda body: body.pop("predictions"),
        "expected 1 predictions, got 2": lambda body: body["predictions"].append(
            prediction(1, None, "7")
        ),
        "has filename": lambda body: body["predictions"][0].update(filename="x.png"),
        "sum to": lambda body: body["predictions"][0]["probabilities"].update(
            {"0": 0.5}
        ),
        "top_k entries": lambda body: body["predictions"][0]["top_k"].pop(),
        "not in order": lambda body: body["predictions"][0]["top_k"].reverse(),
        "has no index 0": lambda body: body["predictions"][0].update(index=3),
    }
    assert check_response(valid, request, top_k=3) == 1
    for message, breakage in breakages.items():
        body = copy.deepcopy(valid)
        breakage(body)
        with pytest.raises(ResponseShapeError, match=message):
            check_response(body, request, top_k=3)
