"""Command line: ``python -m service`` or ``noprop-serve``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from types import FrameType

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.settings import Settings, describe_settings, format_validation_error
from service.state import Phase, ServiceState

logger = logging.getLogger(__name__)

EXIT_INVALID_SETTINGS = 2
EXIT_MODEL_FAILED = 3


class DrainingServer(uvicorn.Server):
    """A uvicorn server that drains before it shuts down.

    On the first SIGTERM or SIGINT, readiness turns 503 at once, new
    classifications continue for NOPROP_DRAIN_DELAY_S, and the requests in
    flight complete. Only then does uvicorn's own shutdown start. A second
    signal skips the rest of the drain.

    When the model fails to load or warm up, the server exits rather than
    stay alive without ever becoming ready, and ``model_failed`` is set.
    """

    def __init__(self, config: uvicorn.Config, state: ServiceState) -> None:
        super().__init__(config)
        self._state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_requested = False
        self._drain: asyncio.Task | None = None
        self.model_failed = False

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def on_tick(self, counter: int) -> bool:
        if self._state.phase is Phase.FAILED and not self.model_failed:
            self.model_failed = True
            logger.error("shutting down, because the model cannot be served")
            self.should_exit = True
        return await super().on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None or self._drain_requested or self.should_exit:
            super().handle_exit(sig, frame)
            return
        self._drain_requested = True
        logger.info("received %s; draining", signal.Signals(sig).name)
        # Signal handlers run between bytecodes of the main thread, so the
        # drain is scheduled on the event loop instead of started here.
        self._loop.call_soon_threadsafe(self._start_drain, sig)

    def _start_drain(self, sig: int) -> None:
        self._drain = asyncio.create_task(self._drain_then_exit(sig))

    async def _drain_then_exit(self, sig: int) -> None:
        try:
            await self._state.drain()
        finally:
            super().handle_exit(sig, None)


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="python -m service",
        description="Serve an exported NoProp ONNX model over HTTP. All settings "
        "come from environment variables.",
        epilog="environment variables:\n" + describe_settings(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as error:
        print(format_validation_error(error), file=sys.stderr)
        return EXIT_INVALID_SETTINGS

    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # use the logging set up above
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )
    state = app.state.service
    server = DrainingServer(config, state)
    server.run()
    if server.model_failed:
        print(
            f"error: cannot serve {settings.model_path}: {state.detail}",
            file=sys.stderr,
        )
        return EXIT_MODEL_FAILED
    return 0
