"""Optional API-key authentication for /classify.

It is off unless NOPROP_API_KEY is set. Clients then send the key in the
X-API-Key header or as ``Authorization: Bearer KEY``. The comparison takes
the same time wherever the keys differ, and the key is never logged.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.errors import ServiceError
from service.routes import StateDep

API_KEY_HEADER = "X-API-Key"

api_key_header = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description="the service's API key, when NOPROP_API_KEY is set",
)
bearer_token = HTTPBearer(
    auto_error=False,
    description="the service's API key as a bearer token, when NOPROP_API_KEY is set",
)


async def check_api_key(
    state: StateDep,
    header_key: Annotated[str | None, Security(api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_token)],
) -> None:
    """Raise 401 unless the request carries the configured API key."""
    expected = state.settings.api_key
    if expected is None:
        return
    presented = (
        header_key if header_key is not None else getattr(bearer, "credentials", None)
    )
    if presented is None or not hmac.compare_digest(
        presented.encode(), expected.get_secret_value().encode()
    ):
        raise ServiceError(
            401,
            "unauthorized",
            f"missing or invalid API key; send it in the {API_KEY_HEADER} header "
            "or as 'Authorization: Bearer KEY'",
            {"WWW-Authenticate": "Bearer"},
        )
