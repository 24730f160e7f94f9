"""While draining, every response closes its connection, so that no client
sends on a keep-alive connection that the server is about to close."""

from __future__ import annotations

import httpx

from service.settings import DEFAULT_MODEL_PATH
from service.state import Phase
from tests.service.conftest import make_settings, run_async, running_app, wait_ready


def test_responses_close_connections_while_draining() -> None:
    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with running_app(make_settings(DEFAULT_MODEL_PATH)) as (app, client):
            await wait_ready(client)
            before = await client.get("/healthz")
            app.state.service.phase = Phase.DRAINING
            during = await client.get("/healthz")
            return before, during

    before, during = run_async(scenario())
    assert "connection" not in before.headers
    assert during.headers["connection"] == "close"
