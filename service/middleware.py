"""ASGI middleware: request ids, request metrics, the last-resort 500 and the
request body size limit.

Both are plain ASGI middleware rather than Starlette's BaseHTTPMiddleware,
which would wrap ``receive`` and hide client disconnects from the routes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ServiceError, error_response
from service.metrics import Metrics

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
# Other methods share one metrics label, so that clients cannot create series.
METRIC_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Client-supplied ids are kept only when they cannot forge log lines.
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestContextMiddleware:
    """Assign a request id, return it in X-Request-ID, record status and latency.

    An exception that no handler turned into a response becomes a JSON 500
    that carries the request id, and is logged with it. While ``draining()``
    is true, responses carry ``Connection: close``.
    """

    def __init__(
        self, app: ASGIApp, metrics: Metrics, draining: Callable[[], bool]
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.draining = draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                if self.draining():
                    # Closing each connection after its response stops clients
                    # from sending on an idle keep-alive connection just as the
                    # server closes it at shutdown, which loses that request.
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as error:
            logger.exception("request %s failed: %s", request_id, error)
            if not started:
                response = error_response(
                    500, "internal_error", "internal server error", request_id
                )
                await response(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            method = scope["method"] if scope["method"] in METRIC_METHODS else "other"
            self.metrics.requests.labels(method, path, str(status)).inc()
            self.metrics.request_seconds.labels(method, path).observe(
                time.perf_counter() - start
            )


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == REQUEST_ID_HEADER.encode():
            candidate = value.decode("latin-1")
            if VALID_REQUEST_ID.fullmatch(candidate):
                return candidate
    return uuid.uuid4().hex


class BodyTooLargeError(ServiceError):
    def __init__(self, max_bytes: int) -> None:
        super().__init__(
            413,
            "request_too_large",
            f"the request body exceeds the maximum of {max_bytes} bytes",
        )


class BodyTimeoutError(ServiceError):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            408,
            "request_timeout",
            f"the request body did not arrive within {timeout_s:g} s",
        )


class BodySizeLimitMiddleware:
    """Reject request bodies over ``max_bytes`` with 413, and slow ones with 408.

    A Content-Length over the limit gets 413 before the body is read. A
    body without Content-Length (chunked) is counted as it arrives, and the
    route reading it gets BodyTooLargeError once it passes the limit. A body
    that is still incomplete ``timeout_s`` after the request started gets
    BodyTimeoutError, so that stalled uploads cannot hold connections open.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            error = BodyTooLargeError(self.max_bytes)
            request_id = scope.get("state", {}).get("request_id")
            logger.info("request %s rejected: %s", request_id, error.message)
            response = error_response(413, error.code, error.message, request_id)
            await response(scope, receive, send)
            return

        received = 0
        body_complete = False
        deadline = asyncio.get_running_loop().time() + self.timeout_s

        async def limited_receive() -> Message:
            nonlocal received, body_complete
            if body_complete:
                # Only a disconnect can follow, which a route may wait for.
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeoutError(self.timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)
                body_complete = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
