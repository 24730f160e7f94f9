"""Errors that become JSON responses, and the app's exception handlers."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

logger = logging.getLogger(__name__)

# Status recorded when the client closed the connection before the response
# (nginx's convention). The client never receives it.
CLIENT_CLOSED_REQUEST = 499


class ServiceError(Exception):
    """An error with its HTTP status, a short code and a message for the client."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.headers = headers or {}


def request_id_of(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def error_response(
    status_code: int,
    code: str,
    message: str,
    request_id: str | None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "request_id": request_id}}
    return JSONResponse(body, status_code=status_code, headers=headers)


async def _handle_service_error(request: Request, error: ServiceError) -> JSONResponse:
    request_id = request_id_of(request)
    level = logging.ERROR if error.status_code >= 500 else logging.INFO
    logger.log(
        level,
        "request %s failed with %d %s: %s",
        request_id,
        error.status_code,
        error.code,
        error.message,
    )
    return error_response(
        error.status_code, error.code, error.message, request_id, error.headers
    )


async def _handle_validation_error(
    request: Request, error: RequestValidationError
) -> JSONResponse:
    problems = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        problems.append(f"{location}: {item['msg']}")
    message = "; ".join(problems)
    request_id = request_id_of(request)
    logger.info("request %s failed with 422 invalid_request: %s", request_id, message)
    return error_response(422, "invalid_request", message, request_id)


async def _handle_http_exception(
    request: Request, error: HTTPException
) -> JSONResponse:
    request_id = request_id_of(request)
    code = {404: "not_found", 405: "method_not_allowed"}.get(
        error.status_code, "invalid_request"
    )
    logger.info(
        "request %s failed with %d: %s", request_id, error.status_code, error.detail
    )
    return error_response(
        error.status_code, code, str(error.detail), request_id, error.headers
    )


def add_exception_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _handle_service_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(HTTPException, _handle_http_exception)
