"""The service's life cycle: loading and warm-up, readiness, draining and stopping."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from service.batcher import Batcher
from service.errors import ServiceError
from service.metrics import Metrics
from service.model import ModelSession
from service.settings import CUDA_PROVIDER, Settings, env_name

logger = logging.getLogger(__name__)

RETRY_AFTER_S = "1"


class Phase(enum.StrEnum):
    STARTING = "starting"  # loading and warming up the model
    READY = "ready"
    FAILED = "failed"  # the model cannot be served; see ServiceState.detail
    DRAINING = "draining"  # shutdown began; readiness is 503


class ServiceState:
    """The model session, the batcher and the phase of one service instance.

    The session is created, warmed up and run on one worker thread, which the
    batcher also uses, so the session is only ever touched from that thread.
    """

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.phase = Phase.STARTING
        self.detail: str | None = "loading and warming up the model"
        self.model: ModelSession | None = None
        self.batcher: Batcher | None = None
        self.accepting = True  # False once draining stops new classifications
        self.in_flight = 0  # /classify requests being handled
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="noprop-inference"
        )

    async def start(self) -> None:
        """Load and warm up the model on the worker thread, then become ready.

        Any failure leaves the phase FAILED with the reason in ``detail``.
        """
        loop = asyncio.get_running_loop()
        try:
            self.model = await loop.run_in_executor(self._executor, self._load)
            self._check_providers()
        except Exception as error:
            self._fail(error)
            return

        self.batcher = Batcher(
            self._executor,
            self.model.run,
            max_batch_size=self.settings.max_batch_size,
            max_queue_delay_ms=self.settings.max_queue_delay_ms,
            max_queue_size=self.settings.max_queue_size,
            metrics=self.metrics,
        )
        self.batcher.start()
        if self.phase is Phase.STARTING:
            self.phase = Phase.READY
            self.detail = None
            logger.info("ready")

    def _load(self) -> ModelSession:
        settings = self.settings
        logger.info("loading model %s", settings.model_path)
        model = ModelSession(
            settings.model_path,
            settings.resolved_model_name,
            settings.execution_providers,
            settings.intra_op_num_threads,
            settings.intra_op_allow_spinning,
        )
        info = model.info
        logger.info(
            "loaded model %s version %s: %d classes, input %s, active execution "
            "providers %s",
            info.name,
            info.version,
            info.num_classes,
            "x".join(map(str, info.input_shape)),
            ", ".join(info.providers),
        )
        if settings.require_cuda and CUDA_PROVIDER not in info.providers:
            return model  # _check_providers reports it; no warm-up on the wrong device
        seconds = model.warm_up(settings.max_batch_size)
        logger.info(
            "warmed up batch sizes 1 to %d in %.2f s", settings.max_batch_size, seconds
        )
        return model

    def _check_providers(self) -> None:
        providers = self.model.info.providers
        if self.settings.require_cuda and CUDA_PROVIDER not in providers:
            raise RuntimeError(
                f"{env_name('require_cuda')} is set, but {CUDA_PROVIDER} is not "
                f"active (active execution providers: {', '.join(providers)}); "
                "check the GPU, the CUDA libraries and the onnxruntime-gpu package"
            )

    def _fail(self, error: Exception) -> None:
        self.phase = Phase.FAILED
        self.detail = str(error)
        logger.error("the service will not become ready: %s", error)

    def check_accepting(self) -> Batcher:
        """Return the batcher, or raise 503 while not ready or after draining."""
        if not self.accepting:
            raise shutting_down_error()
        if self.batcher is None or self.phase is Phase.FAILED:
            raise ServiceError(
                503,
                "not_ready",
                f"the model is not ready: {self.detail}",
                {"Retry-After": RETRY_AFTER_S},
            )
        return self.batcher

    @contextmanager
    def track_request(self) -> Iterator[None]:
        """Count a /classify request as in flight, for draining."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def drain(self) -> None:
        """Turn readiness off, stop new classifications after the drain delay,
        and wait for requests in flight, at most ``shutdown_timeout_s``.

        Requests still waiting for a batch after that get 503.
        """
        self.phase = Phase.DRAINING
        self.detail = "the service is shutting down"
        logger.info(
            "draining: readiness is off; new classifications end in %.1f s",
            self.settings.drain_delay_s,
        )
        await asyncio.sleep(self.settings.drain_delay_s)
        self.accepting = False

        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.in_flight:
            logger.error(
                "drain timed out after %.1f s with %d requests in flight; "
                "failing their queued images",
                self.settings.shutdown_timeout_s,
                self.in_flight,
            )
            if self.batcher is not None:
                await self.batcher.stop(timeout=0)
        else:
            logger.info("drained: no requests in flight")

    async def stop(self) -> None:
        """Run or fail every queued image, then release the worker thread."""
        self.accepting = False
        if self.batcher is not None:
            await self.batcher.stop(self.settings.shutdown_timeout_s)
        self._executor.shutdown(wait=False, cancel_futures=True)


def shutting_down_error() -> ServiceError:
    return ServiceError(
        503,
        "shutting_down",
        "the service is shutting down; retry on another instance",
        {"Retry-After": RETRY_AFTER_S},
    )
