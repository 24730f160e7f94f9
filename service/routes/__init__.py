"""HTTP routes: /classify, and the health, model and metrics endpoints."""

from typing import Annotated

from fastapi import Depends, Request

from service.state import ServiceState


async def get_state(request: Request) -> ServiceState:
    # async, because FastAPI runs a plain def dependency in its thread pool,
    # which costs a thread hand-off on every request.
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]
