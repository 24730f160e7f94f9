"""Build /classify requests in every form the service accepts and check responses.

The forms, each carrying real image files unchanged:

- ``raw``: one image as the body, ``Content-Type: image/png`` (or the type
  that matches the file's suffix);
- ``octet-stream``: one image as the body, ``application/octet-stream``;
- ``multipart``: one or more files in the multipart field ``images``;
- ``multipart-image``: one file in the multipart field ``image``;
- ``json``: ``{"images": [base64, ...]}``;
- ``data-url``: the same with ``data:image/png;base64,`` prefixes.
"""

from __future__ import annotations

import base64
import json
import math
import uuid
from dataclasses import dataclass
from typing import Any

from loadtest.images import TestImage

FORMS = ("raw", "octet-stream", "multipart", "multipart-image", "json", "data-url")
SINGLE_IMAGE_FORMS = ("raw", "octet-stream", "multipart-image")
MEDIA_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".gif": "image/gif",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
}
MULTIPART_BOUNDARY = f"loadtest-{uuid.uuid4().hex}"
# float32 probabilities summed in float64 stay far inside this.
PROBABILITY_SUM_TOLERANCE = 1e-3


class ResponseShapeError(Exception):
    """A 200 response whose body does not match the /classify response schema."""


@dataclass(frozen=True)
class ClassifyRequest:
    """One /classify request: its form, headers, body and the images it carries."""

    form: str
    headers: dict[str, str]
    body: bytes
    images: tuple[TestImage, ...]

    @property
    def sends_filenames(self) -> bool:
        """Whether the service echoes the images' file names in its predictions."""
        return self.form.startswith("multipart")


def parse_forms(text: str) -> tuple[str, ...]:
    """Parse a comma-separated list of form names; raise ValueError on unknown ones."""
    forms = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in forms if name not in FORMS]
    if not forms or unknown:
        raise ValueError(
            f"invalid request forms {text!r}; choose from {', '.join(FORMS)}"
        )
    return forms


def media_type_of(image: TestImage) -> str:
    suffix = "." + image.filename.rsplit(".", 1)[-1].lower()
    return MEDIA_TYPES.get(suffix, "application/octet-stream")


def build_request(form: str, images: list[TestImage]) -> ClassifyRequest:
    """Encode ``images`` as one request body of the given form."""
    if form in SINGLE_IMAGE_FORMS and len(images) != 1:
        raise ValueError(f"form {form!r} carries one image, not {len(images)}")
    if form == "raw":
        headers = {"Content-Type": media_type_of(images[0])}
        return ClassifyRequest(form, headers, images[0].data, tuple(images))
    if form == "octet-stream":
        headers = {"Content-Type": "application/octet-stream"}
        return ClassifyRequest(form, headers, images[0].data, tuple(images))
    if form in ("multipart", "multipart-image"):
        field = "images" if form == "multipart" else "image"
        return _multipart_request(form, field, images)
    if form in ("json", "data-url"):
        return _json_request(form, images)
    raise ValueError(f"unknown request form {form!r}; choose from {', '.join(FORMS)}")


def _multipart_request(
    form: str, field: str, images: list[TestImage]
) -> ClassifyRequest:
    parts = []
    for image in images:
        header = (
            f"--{MULTIPART_BOUNDARY}\r\n"
            f'Content-Disposition: form-data; name="{field}"; '
            f'filename="{image.filename}"\r\n'
            f"Content-Type: {media_type_of(image)}\r\n\r\n"
        )
        parts.append(header.encode() + image.data + b"\r\n")
    parts.append(f"--{MULTIPART_BOUNDARY}--\r\n".encode())
    headers = {"Content-Type": f"multipart/form-data; boundary={MULTIPART_BOUNDARY}"}
    return ClassifyRequest(form, headers, b"".join(parts), tuple(images))


def _json_request(form: str, images: list[TestImage]) -> ClassifyRequest:
    encoded = []
    for image in images:
        text = base64.b64encode(image.data).decode("ascii")
        if form == "data-url":
            text = f"data:{media_type_of(image)};base64,{text}"
        encoded.append(text)
    body = json.dumps({"images": encoded}).encode()
    headers = {"Content-Type": "application/json"}
    return ClassifyRequest(form, headers, body, tuple(images))


def check_response(payload: Any, request: ClassifyRequest, top_k: int) -> int:
    """Check a 200 /classify body against the request that produced it.

    Returns the number of predictions whose most probable class equals the
    image's known label. Raises ResponseShapeError naming the first problem.
    """
    if not isinstance(payload, dict):
        raise ResponseShapeError(f"the body is a JSON {type(payload).__name__}")
    for key in ("model", "model_version", "request_id", "predictions"):
        if key not in payload:
            raise ResponseShapeError(f"the body has no {key!r} field")
    predictions = payload["predictions"]
    if not isinstance(predictions, list) or len(predictions) != len(request.images):
        raise ResponseShapeError(
            f"expected {len(request.images)} predictions, got "
            f"{_describe_length(predictions)}"
        )

    correct = 0
    for index, (prediction, image) in enumerate(
        zip(predictions, request.images, strict=True)
    ):
        top_label = check_prediction(prediction, index, top_k)
        filename = image.filename if request.sends_filenames else None
        if prediction.get("filename") != filename:
            raise ResponseShapeError(
                f"prediction {index} has filename {prediction.get('filename')!r}, "
                f"expected {filename!r}"
            )
        correct += int(image.label is not None and top_label == image.label)
    return correct


def check_prediction(prediction: Any, index: int, top_k: int) -> str:
    """Check one prediction's fields; return its most probable label."""
    if not isinstance(prediction, dict) or prediction.get("index") != index:
        raise ResponseShapeError(f"prediction {index} has no index {index}")
    probabilities = prediction.get("probabilities")
    if not isinstance(probabilities, dict) or not probabilities:
        raise ResponseShapeError(f"prediction {index} has no probabilities")
    values = list(probabilities.values())
    if not all(isinstance(value, float | int) and 0 <= value <= 1 for value in values):
        raise ResponseShapeError(f"prediction {index} has a probability outside [0, 1]")
    if not math.isclose(sum(values), 1.0, abs_tol=PROBABILITY_SUM_TOLERANCE):
        raise ResponseShapeError(
            f"prediction {index}'s probabilities sum to {sum(values):.6f}, not 1"
        )

    ranked = prediction.get("top_k")
    expected_length = min(top_k, len(probabilities))
    if not isinstance(ranked, list) or len(ranked) != expected_length:
        raise ResponseShapeError(
            f"prediction {index} has {_describe_length(ranked)} top_k entries, "
            f"expected {expected_length}"
        )
    labels = [entry.get("label") for entry in ranked if isinstance(entry, dict)]
    if len(labels) != len(ranked) or not all(
        label in probabilities for label in labels
    ):
        raise ResponseShapeError(
            f"prediction {index}'s top_k names a class missing from probabilities"
        )
    if labels != sorted(labels, key=lambda label: -probabilities.get(label, -1.0)):
        raise ResponseShapeError(f"prediction {index}'s top_k is not in order")
    best = max(probabilities, key=probabilities.__getitem__)
    if probabilities[labels[0]] != probabilities[best]:
        raise ResponseShapeError(
            f"prediction {index}'s top_k starts with {labels[0]!r}, not {best!r}"
        )
    return labels[0]


def _describe_length(value: Any) -> str:
    return str(len(value)) if isinstance(value, list) else type(value).__name__
