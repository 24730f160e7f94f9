"""Property-based fuzzing of the real server from its own OpenAPI document.

Schemathesis generates requests for every operation in /openapi.json, both
ones that the schema allows and ones that break it, and sends them over HTTP.
No request may get a 5xx, a stack trace or crash the server.
"""

from __future__ import annotations

import itertools

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error

from tests.service.conftest import ServerProcess

# Examples per operation; the whole run takes about a minute on two cores.
MAX_EXAMPLES = 150


@pytest.fixture(scope="module")
def api_schema(hardened_server: ServerProcess):
    return schemathesis.openapi.from_url(f"{hardened_server.url}/openapi.json")


def test_api_fuzz(api_schema, hardened_server: ServerProcess) -> None:
    # Schemathesis's own pytest plugin fails on pytest 9 (schemathesis 4.32.5),
    # so each operation's strategy runs under hypothesis directly.
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert any(operation.path == "/classify" for operation in operations)
    for operation, mode in itertools.product(operations, schemathesis.GenerationMode):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def check(case) -> None:
            response = case.call(timeout=30)
            case.validate_response(response, checks=(not_a_server_error,))
            assert "Traceback" not in response.text
            assert hardened_server.process.poll() is None, hardened_server.log()[-2000:]

        try:
            check()
        except Unsatisfiable:
            # An operation without parameters or body has no invalid requests.
            assert mode is schemathesis.GenerationMode.NEGATIVE, operation.path
