"""POST /classify: decode the uploaded images, batch them, return probabilities."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request, Security
from PIL import Image
from starlette.concurrency import run_in_threadpool

from service.auth import check_api_key
from service.batcher import (
    Batcher,
    BatcherClosedError,
    BatchError,
    DeadlineExceededError,
    QueueFullError,
)
from service.errors import CLIENT_CLOSED_REQUEST, ServiceError, request_id_of
from service.images import ImageError, convert_image, open_image
from service.inputs import Upload, read_uploads
from service.model import ModelInfo
from service.routes import StateDep
from service.schemas import (
    ClassifyJSONRequest,
    ClassifyResponse,
    ClassProbability,
    ErrorResponse,
    Prediction,
)
from service.state import RETRY_AFTER_S, shutting_down_error

logger = logging.getLogger(__name__)
router = APIRouter(tags=["classify"])

DEFAULT_TOP_K = 5
# Requests with at most this many pixels in all their images are decoded on
# the event loop. That is 5 MNIST digits, about 0.15 ms each to decode on a
# 2-core AMD EPYC VM.
INLINE_DECODE_MAX_PIXELS = 4096
RAW_IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp")
_BINARY = {"schema": {"type": "string", "format": "binary"}}
REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "description": "One image as the raw body, images as multipart files, or "
        "base64 images in JSON.",
        "content": {
            **{media_type: _BINARY for media_type in RAW_IMAGE_TYPES},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                        }
                    },
                }
            },
            "application/json": {
                "schema": ClassifyJSONRequest.model_json_schema(),
                "examples": {
                    "base64": {
                        "summary": "one base64 PNG",
                        "value": {"images": ["iVBORw0KGgoAAAANSUhEUgAA..."]},
                    }
                },
            },
        },
    }
}
ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "invalid request or image",
        401: "missing or invalid API key, when NOPROP_API_KEY is set",
        408: "the request body did not arrive within NOPROP_BODY_TIMEOUT_S",
        413: "body, image or image count over its limit",
        415: "unsupported Content-Type",
        422: "invalid query parameter",
        429: "queue full; retry after Retry-After seconds",
        500: "inference failed",
        503: "model not ready, or the service is shutting down",
        504: "timed out waiting for the result",
    }.items()
}


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=REQUEST_BODY,
    summary="Classify one or more images",
    dependencies=[Security(check_api_key)],
)
async def classify(
    request: Request,
    state: StateDep,
    top_k: Annotated[
        int | None,
        Query(
            ge=1,
            description="number of most probable classes to list "
            f"(default: {DEFAULT_TOP_K}, or every class when there are fewer)",
        ),
    ] = None,
) -> ClassifyResponse:
    """Return every class's probability and the top-k classes for each image.

    Images of any size and colour mode are resized and converted to the
    model's input.
    """
    with state.track_request():
        settings = state.settings
        deadline = time.monotonic() + settings.request_timeout_s
        request_id = request_id_of(request)
        batcher = state.check_accepting()
        info = state.model.info
        k = _resolve_top_k(top_k, info.num_classes)

        uploads = await read_uploads(request, settings.max_images_per_request)
        opened = _open_all(uploads, settings.max_image_pixels)
        pixels = sum(image.width * image.height for image in opened)
        if pixels <= INLINE_DECODE_MAX_PIXELS:
            # Handing small images to a thread costs more CPU than decoding them.
            images = _convert_all(opened, info.input_shape)
        else:
            images = await run_in_threadpool(_convert_all, opened, info.input_shape)
        rows = await _wait_for_rows(batcher, images, request, deadline)
        return _build_response(info, request_id, uploads, rows, k)


def _resolve_top_k(top_k: int | None, num_classes: int) -> int:
    if top_k is None:
        return min(DEFAULT_TOP_K, num_classes)
    if top_k > num_classes:
        raise ServiceError(
            422,
            "invalid_request",
            f"top_k={top_k} exceeds the number of classes ({num_classes})",
        )
    return top_k


def _open_all(uploads: list[Upload], max_pixels: int) -> list[Image.Image]:
    """Read every image's header. Raise ServiceError naming the first invalid one."""
    images = []
    for index, upload in enumerate(uploads):
        try:
            images.append(open_image(upload.data, max_pixels))
        except ImageError as error:
            raise _image_error(index, error) from error
    return images


def _convert_all(
    images: list[Image.Image], input_shape: tuple[int, int, int]
) -> list[np.ndarray]:
    arrays = []
    for index, image in enumerate(images):
        try:
            arrays.append(convert_image(image, input_shape))
        except ImageError as error:
            raise _image_error(index, error) from error
    return arrays


def _image_error(index: int, error: ImageError) -> ServiceError:
    return ServiceError(error.status_code, error.code, f"image {index}: {error}")


async def _wait_for_rows(
    batcher: Batcher, images: list[np.ndarray], request: Request, deadline: float
) -> list[np.ndarray]:
    """Queue the images and wait for their rows, the deadline or a disconnect."""
    request_id = request_id_of(request)
    try:
        futures = batcher.submit(images, request_id, deadline)
    except QueueFullError as error:
        raise ServiceError(
            429,
            "queue_full",
            f"the server is busy: {error}; retry later",
            {"Retry-After": RETRY_AFTER_S},
        ) from error
    except BatcherClosedError as error:
        raise shutting_down_error() from error

    disconnect = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        pending = set(futures)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _timed_out(request)
            done, _ = await asyncio.wait(
                pending | {disconnect},
                timeout=remaining,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if disconnect in done:
                raise ServiceError(
                    CLIENT_CLOSED_REQUEST,
                    "client_closed_request",
                    "the client closed the connection before the result",
                )
            pending -= done
            for future in done:
                if future.exception() is not None:
                    raise _error_for(future.exception(), request)
        return [future.result() for future in futures]
    finally:
        disconnect.cancel()
        for future in futures:
            if future.done() and not future.cancelled():
                future.exception()  # marks the outcome as retrieved
            else:
                future.cancel()  # the batcher drops cancelled images


async def _wait_for_disconnect(request: Request) -> None:
    """Return when the client disconnects; the request body is already read."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _error_for(error: BaseException, request: Request) -> ServiceError:
    if isinstance(error, DeadlineExceededError):
        return _timed_out(request)
    if isinstance(error, BatcherClosedError):
        return shutting_down_error()
    if isinstance(error, BatchError):
        return ServiceError(
            500,
            "inference_failed",
            f"inference failed for request {request_id_of(request)}",
        )
    return ServiceError(500, "internal_error", f"unexpected error: {error}")


def _timed_out(request: Request) -> ServiceError:
    timeout = request.app.state.service.settings.request_timeout_s
    return ServiceError(
        504, "timeout", f"no result within the request timeout of {timeout:g} s"
    )


def _build_response(
    info: ModelInfo,
    request_id: str,
    uploads: list[Upload],
    rows: list[np.ndarray],
    k: int,
) -> ClassifyResponse:
    predictions = []
    for index, (upload, row) in enumerate(zip(uploads, rows, strict=True)):
        probabilities = [float(value) for value in row]
        order = np.argsort(-row, kind="stable")[:k]  # most probable first
        predictions.append(
            Prediction(
                index=index,
                filename=upload.filename,
                probabilities=dict(zip(info.class_names, probabilities, strict=True)),
                top_k=[
                    ClassProbability(
                        label=info.class_names[i], probability=probabilities[i]
                    )
                    for i in order
                ],
            )
        )
    return ClassifyResponse(
        model=info.name,
        model_version=info.version,
        request_id=request_id,
        predictions=predictions,
    )
