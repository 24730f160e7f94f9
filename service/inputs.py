"""Read the images of a /classify request: raw body, multipart upload or JSON."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import pydantic
from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from service.errors import ServiceError
from service.schemas import ClassifyJSONRequest

MULTIPART_FIELDS = ("image", "images")
RAW_CONTENT_TYPES = ("image/", "application/octet-stream")
ACCEPTED_CONTENT_TYPES = (
    "image/* (one image as the raw body), multipart/form-data (files in fields "
    f"{' or '.join(MULTIPART_FIELDS)}) or application/json "
    '({"images": [base64, ...]})'
)
# Non-file multipart fields are rejected, so a handful bounds the parser's work.
MAX_MULTIPART_FIELDS = 8


@dataclass(frozen=True)
class Upload:
    data: bytes
    filename: str | None = None


def invalid_request(message: str) -> ServiceError:
    return ServiceError(400, "invalid_request", message)


async def read_uploads(request: Request, max_images: int) -> list[Upload]:
    """Return the request's images as undecoded bytes; raise ServiceError."""
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        uploads = await _read_multipart(request, max_images)
    elif media_type == "application/json":
        uploads = _read_json(await request.body())
    elif media_type.startswith(RAW_CONTENT_TYPES):
        uploads = [Upload(await request.body())]
    else:
        raise ServiceError(
            415,
            "unsupported_media_type",
            f"unsupported Content-Type {content_type or '(none)'!r}; send "
            f"{ACCEPTED_CONTENT_TYPES}",
        )

    if not uploads:
        raise invalid_request("the request contains no images")
    if len(uploads) > max_images:
        raise _too_many_images(str(len(uploads)), max_images)
    return uploads


def _too_many_images(count: str, max_images: int) -> ServiceError:
    return ServiceError(
        413,
        "too_many_images",
        f"the request contains {count} images; the maximum is {max_images}",
    )


async def _read_multipart(request: Request, max_images: int) -> list[Upload]:
    try:
        form = await request.form(max_files=max_images, max_fields=MAX_MULTIPART_FIELDS)
    except HTTPException as error:
        # Starlette's parser reports its limits and syntax errors as 400.
        if "Too many files" in str(error.detail):
            raise _too_many_images(f"more than {max_images}", max_images) from error
        raise invalid_request(f"invalid multipart body: {error.detail}") from error

    try:
        uploads = []
        for name, value in form.multi_items():
            if name not in MULTIPART_FIELDS:
                raise invalid_request(
                    f"unknown multipart field {name!r}; send files in "
                    f"{' or '.join(MULTIPART_FIELDS)}"
                )
            if not isinstance(value, UploadFile):
                raise invalid_request(
                    f"multipart field {name!r} must be a file upload, not text"
                )
            uploads.append(Upload(await value.read(), value.filename))
        return uploads
    finally:
        await form.close()


def _read_json(body: bytes) -> list[Upload]:
    try:
        parsed = ClassifyJSONRequest.model_validate_json(body)
    except pydantic.ValidationError as error:
        raise invalid_request(_describe_json_errors(error)) from error

    uploads = []
    for index, text in enumerate(parsed.images):
        uploads.append(Upload(_decode_base64(text, index)))
    return uploads


def _describe_json_errors(error: pydantic.ValidationError) -> str:
    problems = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "body"
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown field {location!r}; the only field is 'images'")
        elif item["type"] == "json_invalid":
            problems.append(f"the body is not valid JSON: {item['msg']}")
        else:
            problems.append(f"{location}: {item['msg']}")
    return "invalid JSON request: " + "; ".join(problems)


def _decode_base64(text: str, index: int) -> bytes:
    if text.startswith("data:"):
        header, separator, text = text.partition(",")
        if not separator or not header.endswith(";base64"):
            raise invalid_request(
                f"images[{index}] is a data URL without ';base64,'; only base64 "
                "data URLs are accepted"
            )
    text = "".join(text.split())  # tolerate line-wrapped base64
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise invalid_request(
            f"images[{index}] is not valid base64: {error}"
        ) from error
