"""The FastAPI app factory."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from importlib import metadata

from fastapi import FastAPI

from service.errors import add_exception_handlers
from service.metrics import Metrics
from service.middleware import BodySizeLimitMiddleware, RequestContextMiddleware
from service.routes import classify, status
from service.settings import Settings
from service.state import Phase, ServiceState

logger = logging.getLogger(__name__)

DESCRIPTION = """\
Classifies images with a NoProp model exported to ONNX, run by onnxruntime.
Concurrent requests are batched together. Every response carries an
X-Request-ID header, and errors carry the same id in their JSON body.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. Settings come from NOPROP_* variables unless given.

    The model loads and warms up in the background after start-up, so
    /healthz returns 200 at once and /readyz returns 503 until the model is ready.
    Raises pydantic.ValidationError for invalid settings.
    """
    settings = settings if settings is not None else Settings()
    metrics = Metrics()
    state = ServiceState(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logger.info("starting with settings %s", settings.model_dump(mode="json"))
        loading = asyncio.create_task(state.start(), name="load-model")
        try:
            yield
        finally:
            logger.info("shutting down")
            loading.cancel()
            with suppress(asyncio.CancelledError):
                await loading
            await state.stop()
            logger.info("shutdown complete")

    app = FastAPI(
        title="NoProp classifier",
        description=DESCRIPTION,
        version=_package_version(),
        lifespan=lifespan,
    )
    app.state.service = state
    app.include_router(classify.router)
    app.include_router(status.router)
    add_exception_handlers(app)

    # The last middleware added runs first: request ids wrap the size limit.
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_bytes=settings.max_upload_bytes,
        timeout_s=settings.body_timeout_s,
    )
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        draining=lambda: state.phase is Phase.DRAINING,
    )
    return app


def _package_version() -> str:
    try:
        return metadata.version("noprop-serve")
    except metadata.PackageNotFoundError:
        return "unknown"
