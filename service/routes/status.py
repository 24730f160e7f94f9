"""GET /healthz, /readyz, /model and /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.errors import ServiceError
from service.routes import StateDep
from service.schemas import (
    BatchingSettings,
    ErrorResponse,
    InputShape,
    Liveness,
    ModelDescription,
    Readiness,
    RequestLimits,
)
from service.state import Phase

router = APIRouter(tags=["status"])


@router.get("/healthz", response_model=Liveness, summary="Liveness")
async def healthz() -> Liveness:
    """Return 200 while the process serves HTTP, even before the model is ready."""
    return Liveness(status="alive")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "not ready"}},
    summary="Readiness",
)
async def readyz(state: StateDep) -> JSONResponse:
    """Return 200 once the model is loaded and warmed up; 503 while starting,
    after a failed start and while draining."""
    body = Readiness(status=state.phase.value, detail=state.detail)
    status_code = 200 if state.phase is Phase.READY else 503
    return JSONResponse(body.model_dump(), status_code=status_code)


@router.get(
    "/model",
    response_model=ModelDescription,
    responses={503: {"model": ErrorResponse, "description": "model not loaded"}},
    summary="Model and serving settings",
)
async def model(state: StateDep) -> ModelDescription:
    """Describe the loaded model: classes, input shape, active execution
    providers, batching settings, request limits and metadata."""
    if state.model is None:
        raise ServiceError(503, "not_ready", f"no model loaded: {state.detail}")
    info = state.model.info
    settings = state.settings
    height, width, channels = info.input_shape
    return ModelDescription(
        name=info.name,
        version=info.version,
        sha256=info.sha256,
        classes=list(info.class_names),
        input_shape=InputShape(height=height, width=width, channels=channels),
        execution_providers=list(info.providers),
        requested_providers=settings.execution_providers,
        batching=BatchingSettings(
            max_batch_size=settings.max_batch_size,
            max_queue_delay_ms=settings.max_queue_delay_ms,
            max_queue_size=settings.max_queue_size,
            request_timeout_s=settings.request_timeout_s,
        ),
        limits=RequestLimits(
            max_upload_bytes=settings.max_upload_bytes,
            max_images_per_request=settings.max_images_per_request,
            max_image_pixels=settings.max_image_pixels,
        ),
        metadata=info.metadata,
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
    summary="Prometheus metrics",
)
async def metrics(state: StateDep) -> Response:
    """Return the metrics in the Prometheus text format."""
    return Response(
        generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )
