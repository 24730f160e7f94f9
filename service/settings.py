"""Service settings from NOPROP_* environment variables, checked at start-up."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Annotated, Literal

import onnxruntime as ort
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "NOPROP_"
CUDA_PROVIDER = "CUDAExecutionProvider"
MIN_API_KEY_CHARS = 16
# Settings whose values error messages must not repeat.
SECRET_FIELDS = frozenset({"api_key"})
CPU_PROVIDER = "CPUExecutionProvider"

# The repository's default model. The path is resolved from this file, so it is
# only right for a checkout or an editable install; other installs must set
# NOPROP_MODEL_PATH.
REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_PATH = REPOSITORY_ROOT / "models" / "mnist-dt-onehot" / "model.onnx"


class Settings(BaseSettings):
    """Configuration of one service process; every field has a NOPROP_ variable."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True
    )

    model_path: Path = Field(
        DEFAULT_MODEL_PATH, description="exported ONNX model file to serve"
    )
    model_name: str | None = Field(
        None,
        min_length=1,
        description="name reported in responses; when unset, the model file's "
        "folder name, or its stem when the file is not named model.onnx",
    )
    execution_providers: Annotated[list[str], NoDecode] = Field(
        [CUDA_PROVIDER, CPU_PROVIDER],
        description="onnxruntime execution providers in order of preference, "
        "comma-separated; providers that this onnxruntime build lacks are skipped",
    )
    require_cuda: bool = Field(
        False,
        description="exit at start-up (status 3) unless the CUDA execution "
        "provider is active",
    )
    max_batch_size: int = Field(
        32, ge=1, le=1024, description="maximum number of images in one batch"
    )
    max_queue_delay_ms: float = Field(
        5.0,
        ge=0,
        le=10_000,
        description="maximum time in ms that the first image in the queue waits "
        "for a full batch",
    )
    max_queue_size: int = Field(
        1024,
        ge=1,
        description="maximum number of images waiting for a batch; beyond it "
        "requests get 429",
    )
    request_timeout_s: float = Field(
        10.0,
        gt=0,
        description="maximum time in seconds from the start of handling to the "
        "result; beyond it a request gets 504",
    )
    max_upload_bytes: int = Field(
        10 * 1024 * 1024,
        ge=1,
        description="maximum request body size in bytes; larger bodies get 413",
    )
    api_key: SecretStr | None = Field(
        None,
        description="API key that /classify requires in the X-API-Key header or "
        "as a bearer token (at least 16 characters); unset: no authentication",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="maximum time in seconds to receive a request body; slower "
        "uploads get 408",
    )
    max_images_per_request: int = Field(
        64, ge=1, description="maximum number of images in one request"
    )
    max_image_pixels: int = Field(
        4096 * 4096,
        ge=1,
        description="maximum width * height of one decoded image; larger images "
        "get 413",
    )
    intra_op_num_threads: int = Field(
        0,
        ge=0,
        description="CPU threads that onnxruntime uses inside one operator "
        "(0: onnxruntime's default, one per physical core)",
    )
    intra_op_allow_spinning: bool = Field(
        False,
        description="let onnxruntime's intra-op threads spin while they wait for "
        "work. Batches finish sooner on an idle machine, but the spinning takes "
        "CPU from request handling on the same cores",
    )
    host: str = Field("127.0.0.1", min_length=1, description="address to bind")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to bind")
    drain_delay_s: float = Field(
        0.0,
        ge=0,
        description="time in seconds between SIGTERM and the end of new "
        "classifications, while /readyz already returns 503, so that load "
        "balancers can stop sending traffic",
    )
    shutdown_timeout_s: float = Field(
        30.0,
        gt=0,
        description="maximum time in seconds that shutdown waits for requests "
        "in flight",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="log level of the service and of uvicorn"
    )
    access_log: bool = Field(
        False,
        description="log one line per HTTP request (uvicorn's access log). "
        "/metrics counts requests by route and status either way",
    )

    @field_validator("model_path")
    @classmethod
    def _check_model_file(cls, path: Path) -> Path:
        if not path.is_file():
            raise ValueError(
                f"model file not found; set {ENV_PREFIX}MODEL_PATH to an ONNX file "
                "written by the exporter (python -m export)"
            )
        return path

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_api_key_is_unset(cls, value: object) -> object:
        # Compose files pass NOPROP_API_KEY= when the variable is unset.
        return None if value == "" else value

    @field_validator("api_key")
    @classmethod
    def _check_api_key(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None and len(key.get_secret_value()) < MIN_API_KEY_CHARS:
            raise ValueError(
                f"the API key has {len(key.get_secret_value())} characters; "
                f"use at least {MIN_API_KEY_CHARS}"
            )
        return key

    @field_validator("execution_providers", mode="before")
    @classmethod
    def _split_providers(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("execution_providers")
    @classmethod
    def _check_providers(cls, providers: list[str]) -> list[str]:
        if not providers:
            raise ValueError("at least one execution provider is required")
        known = ort.get_all_providers()
        unknown = [name for name in providers if name not in known]
        if unknown:
            raise ValueError(
                f"unknown execution provider {unknown[0]!r}; "
                f"onnxruntime knows {', '.join(known)}"
            )
        return providers

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        if self.require_cuda and CUDA_PROVIDER not in self.execution_providers:
            raise ValueError(
                f"{ENV_PREFIX}REQUIRE_CUDA is set but {CUDA_PROVIDER} is not in "
                f"{ENV_PREFIX}EXECUTION_PROVIDERS"
            )
        if self.max_images_per_request > self.max_queue_size:
            raise ValueError(
                f"{ENV_PREFIX}MAX_IMAGES_PER_REQUEST ({self.max_images_per_request}) "
                f"must not exceed {ENV_PREFIX}MAX_QUEUE_SIZE ({self.max_queue_size}), "
                "because a request must fit in the queue"
            )
        return self

    @property
    def resolved_model_name(self) -> str:
        """Model name for responses: the setting, else taken from the file path."""
        if self.model_name:
            return self.model_name
        if self.model_path.name == "model.onnx" and self.model_path.parent.name:
            return self.model_path.resolve().parent.name
        return self.model_path.stem


def env_name(field: str) -> str:
    """Return the environment variable that sets ``field``."""
    return f"{ENV_PREFIX}{field.upper()}"


def format_validation_error(error: ValidationError) -> str:
    """Format settings errors as one line per invalid variable."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"][:1])
        message = item["msg"].removeprefix("Value error, ")
        value = item["input"]
        if isinstance(value, Path):
            value = str(value)
        if field in SECRET_FIELDS:
            value = "**********"
        if field:
            lines.append(f"invalid {env_name(field)}={value!r}: {message}")
        else:
            lines.append(f"invalid settings: {message}")
    return "\n".join(lines)


def describe_settings() -> str:
    """Return help text listing every environment variable with its default."""
    lines = []
    for name, field in Settings.model_fields.items():
        text = field.description
        if isinstance(field.default, list):
            text += f" (default: {','.join(field.default)})"
        elif field.default is not None:
            text += f" (default: {field.default})"
        lines.append(f"  {env_name(name)}")
        lines.extend(
            textwrap.wrap(
                text,
                width=78,
                initial_indent=" " * 6,
                subsequent_indent=" " * 6,
                break_long_words=False,
                break_on_hyphens=False,
            )
        )
    return "\n".join(lines)
