"""Request and response bodies of the HTTP API, with the examples shown in /docs."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

EXAMPLE_PROBABILITIES = {
    "0": 0.0001,
    "1": 0.0002,
    "2": 0.0011,
    "3": 0.0004,
    "4": 0.0001,
    "5": 0.0001,
    "6": 0.0,
    "7": 0.9952,
    "8": 0.0003,
    "9": 0.0025,
}


class ClassifyJSONRequest(BaseModel):
    """Images as base64 strings, optionally as data URLs."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"images": ["iVBORw0KGgoAAAANSUhEUgAA..."]}]},
    )

    images: list[str] = Field(
        min_length=1,
        description="base64-encoded image files (PNG, JPEG, WebP, BMP, GIF, TIFF, "
        "PPM); a data URL prefix such as data:image/png;base64, is accepted",
    )


class ClassProbability(BaseModel):
    label: str = Field(description="class name")
    probability: float = Field(description="a fraction in [0, 1]")


class Prediction(BaseModel):
    """The classification of one image."""

    index: int = Field(description="position of the image in the request, from 0")
    filename: str | None = Field(
        None, description="file name of a multipart upload, if it had one"
    )
    probabilities: dict[str, float] = Field(
        description="probability of every class, by class name, in model order"
    )
    top_k: list[ClassProbability] = Field(
        description="the k most probable classes, most probable first"
    )


class ClassifyResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "mnist-dt-onehot",
                    "model_version": "3f1c2a9b7d10",
                    "request_id": "5d0c6f7e9b8a4c3d",
                    "predictions": [
                        {
                            "index": 0,
                            "filename": None,
                            "probabilities": EXAMPLE_PROBABILITIES,
                            "top_k": [
                                {"label": "7", "probability": 0.9952},
                                {"label": "9", "probability": 0.0025},
                                {"label": "2", "probability": 0.0011},
                            ],
                        }
                    ],
                }
            ]
        }
    )

    model: str = Field(description="name of the served model")
    model_version: str = Field(
        description="first 12 hex digits of the model file's sha256"
    )
    request_id: str
    predictions: list[Prediction]


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable error code, e.g. invalid_image")
    message: str = Field(description="what was wrong and what is accepted")
    request_id: str | None = None


class ErrorResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "code": "invalid_image",
                        "message": "image 0: the data is not a readable image",
                        "request_id": "5d0c6f7e9b8a4c3d",
                    }
                }
            ]
        }
    )

    error: ErrorDetail


class Liveness(BaseModel):
    status: str = Field(examples=["alive"])


class Readiness(BaseModel):
    status: str = Field(
        description="starting, ready, failed or draining", examples=["ready"]
    )
    detail: str | None = Field(
        None, description="why the service is not ready", examples=[None]
    )


class InputShape(BaseModel):
    height: int
    width: int
    channels: int


class BatchingSettings(BaseModel):
    max_batch_size: int
    max_queue_delay_ms: float
    max_queue_size: int
    request_timeout_s: float


class RequestLimits(BaseModel):
    max_upload_bytes: int
    max_images_per_request: int
    max_image_pixels: int


class ModelDescription(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "mnist-dt-onehot",
                    "version": "3f1c2a9b7d10",
                    "sha256": "3f1c2a9b7d10" + "0" * 52,
                    "classes": list(EXAMPLE_PROBABILITIES),
                    "input_shape": {"height": 28, "width": 28, "channels": 1},
                    "execution_providers": ["CPUExecutionProvider"],
                    "requested_providers": [
                        "CUDAExecutionProvider",
                        "CPUExecutionProvider",
                    ],
                    "batching": {
                        "max_batch_size": 32,
                        "max_queue_delay_ms": 5.0,
                        "max_queue_size": 1024,
                        "request_timeout_s": 10.0,
                    },
                    "limits": {
                        "max_upload_bytes": 10485760,
                        "max_images_per_request": 64,
                        "max_image_pixels": 16777216,
                    },
                    "metadata": {"noprop.dataset": "mnist", "noprop.num_steps": "10"},
                }
            ]
        }
    )

    name: str
    version: str = Field(description="first 12 hex digits of sha256")
    sha256: str = Field(description="sha256 of the ONNX file")
    classes: list[str] = Field(description="class names in output order")
    input_shape: InputShape
    execution_providers: list[str] = Field(
        description="execution providers active in the session, in priority order"
    )
    requested_providers: list[str]
    batching: BatchingSettings
    limits: RequestLimits
    metadata: dict[str, str] = Field(description="the model file's metadata_props")
