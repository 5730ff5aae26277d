"""Property-based API testing with Schemathesis: requests generated from the app's own `/openapi.json` (bodies that
fit the description, and bodies that break it) sent in-process to the app over fake backends, for every operation.
No answer may be a 5xx, have a status the description does not list, or differ from the schema the description gives
its status and content type.

Bounded: `EXAMPLES` examples per operation and mode, derandomised, no shrinking; about ten seconds on two cores.
Fetching http(s) image URLs is off (a generated URL must not reach for the network) and rate limits are out of
reach. Schemathesis' own pytest plugin (`from_fixture`) does not run under pytest 9, so each operation's strategy is
driven by Hypothesis here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import APIOperation
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from orchestrator.api.app import create_app
from orchestrator.settings import FetchSettings, RateLimitSettings, Settings
from orchestrator.wiring import Backends
from tests.fakes import FakeReasoning, FakeVision

EXAMPLES = 50
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
ANALYSING = {"POST /v1/analyze", "POST /v1/chat/completions", "POST /infer", "POST /caption"}


@pytest.fixture
def api_schema() -> Iterator[schemathesis.BaseSchema]:
    limits = Settings(
        fetch=FetchSettings(enabled=False),
        rate_limit=RateLimitSettings(requests_per_s=1e6, burst=10**6, max_concurrent=1000),
    )
    app = create_app(limits, Backends(FakeVision(), FakeReasoning()))
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    # End the app's lifespan, which Schemathesis started (its pytest plugin does it too, after every test: an app,
    # whose backends are closed then, serves one test only).
    asgi.shutdown_lifespans()


def operations(schema: schemathesis.BaseSchema) -> list[APIOperation[Any, Any, Any, Any]]:
    found = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()  # the description parses
        found.append(result.ok())
    return found


def test_every_analysing_endpoint_is_in_the_description(api_schema: schemathesis.BaseSchema) -> None:
    assert {f"{operation.method.upper()} {operation.path}" for operation in operations(api_schema)} >= ANALYSING


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_the_api_keeps_to_its_description(
    api_schema: schemathesis.BaseSchema, mode: schemathesis.GenerationMode
) -> None:
    for operation in operations(api_schema):
        takes = (operation.body, operation.query, operation.headers, operation.path_parameters)
        if mode is schemathesis.GenerationMode.NEGATIVE and not any(len(inputs) for inputs in takes):
            continue  # nothing to break (`GET /health`)

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def check(case: schemathesis.Case[Any]) -> None:
            case.call_and_validate(checks=CHECKS)

        check()
