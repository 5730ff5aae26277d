"""Running a case set through the service's own API, one `POST /v1/analyze` per case (mode `auto`), in this process
or against a running service.

- In this process (`in_process`): the app `create_app(settings)` builds from the `ORCH_*` settings, with its lifespan
  (the models load once), called through httpx's ASGI transport: the same request path as over HTTP, no socket.
- Against a URL (`at_url`): a running service, with its API key when it needs one; `/health` is asked first, so a
  wrong address fails at once instead of once per case.

Each case's `Outcome` keeps what the service said (answer, route, arbitration status, degraded, timings) beside
what the case expected; a case the service refused or failed is an outcome too (its status and error type), scored
as a wrong answer: the figures count every case run.
"""

from __future__ import annotations

import asyncio
import mimetypes
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from itertools import chain, islice, zip_longest
from typing import Any

import httpx

from orchestrator.evaluation.cases import Case
from orchestrator.evaluation.scoring import answer_matches

ANALYZE = "/v1/analyze"


@dataclass(frozen=True)
class Outcome:
    """One case as the service answered it, scored."""

    case: Case
    status: int
    """The HTTP status; 0 when no response came (a connection failure, a timeout)."""
    answer: str = ""
    correct: bool = False
    route: str | None = None
    route_correct: bool | None = None
    """None when the case names no expected route or the service gave none."""
    arbitration: str | None = None
    degraded: bool = False
    needs_review: bool = False
    timings_ms: dict[str, float] = field(default_factory=dict)
    wall_ms: float = 0.0
    error: str | None = None
    """`type: message` of a refused or failed request."""
    models: dict[str, str] = field(default_factory=dict)
    """The stages' `backend/model` that answered, e.g. {"vision": "ocr/rapidocr", "reasoning": "…"}."""


def outcome_of(case: Case, status: int, body: Any, wall_ms: float) -> Outcome:
    """The outcome of one answered request (`body`: the response's JSON, or None). Read liberally: a part missing or
    of another shape (another version of the service) is left out, never an error of the run."""
    if status != 200 or not isinstance(body, dict):
        error = _mapping(_mapping(body).get("error"))
        detail = f"{error.get('type', 'http_error')}: {error.get('message', '')}".strip()
        return Outcome(case, status, wall_ms=wall_ms, error=detail)
    answer = str(body.get("answer") or "")
    decision = _mapping(body.get("route")).get("decision")
    route = decision if isinstance(decision, str) else None
    expected = case.expected_route
    status_of = _mapping(body.get("arbitration")).get("status")
    models = {
        stage: f"{part.get('backend')}/{part.get('model')}"
        for stage in ("vision", "reasoning")
        if isinstance(part := body.get(stage), dict)
    }
    timings = {
        str(stage): float(ms)
        for stage, ms in _mapping(body.get("timings_ms")).items()
        if isinstance(ms, int | float) and not isinstance(ms, bool)
    }
    return Outcome(
        case,
        status,
        answer=answer,
        correct=answer_matches(answer, case.answers),
        route=route,
        route_correct=(route == expected) if expected is not None and route is not None else None,
        arbitration=status_of if isinstance(status_of, str) else None,
        degraded=bool(body.get("degraded")),
        needs_review=bool(body.get("needs_human_review")),
        timings_ms=timings,
        wall_ms=wall_ms,
        models=models,
    )


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


async def ask(client: httpx.AsyncClient, case: Case) -> Outcome:
    """`case` put to the service: its image and question, mode `auto`."""
    mime = mimetypes.guess_type(case.image_name)[0] or "application/octet-stream"
    started = time.perf_counter()
    try:
        response = await client.post(
            ANALYZE,
            files={"image": (case.image_name, case.image, mime)},
            data={"question": case.question, "mode": "auto"},
        )
    except httpx.HTTPError as exc:
        wall_ms = (time.perf_counter() - started) * 1000
        return Outcome(case, 0, wall_ms=wall_ms, error=f"{type(exc).__name__}: {exc}")
    wall_ms = (time.perf_counter() - started) * 1000
    try:
        body = response.json()
    except ValueError:
        body = None
    return outcome_of(case, response.status_code, body, wall_ms)


async def run_cases(
    client: httpx.AsyncClient,
    cases: Sequence[Case],
    *,
    concurrency: int = 1,
    on_done: Callable[[Outcome], None] = lambda _: None,
) -> list[Outcome]:
    """Every case asked, at most `concurrency` at once (1: one after another, so that latencies are a lone
    request's); the outcomes in the cases' order. `on_done` is told of each as it completes."""
    gate = asyncio.Semaphore(concurrency)

    async def one(case: Case) -> Outcome:
        async with gate:
            outcome = await ask(client, case)
        on_done(outcome)
        return outcome

    return list(await asyncio.gather(*(one(case) for case in cases)))


def take(cases: Sequence[Case], limit: int | None) -> list[Case]:
    """The first `limit` cases taken in turn from each category (and within one, in turn from each language and kind
    of question), so that a small slice still covers every kind of image and question; all of them, in order,
    without a limit."""
    if limit is None or limit >= len(cases):
        return list(cases)
    categories = [
        _alternating(group, lambda c: f"{c.language}/{c.kind}") for group in _groups(cases, lambda c: c.category)
    ]
    return list(islice(_alternating_lists(categories), limit))


def _groups(cases: Sequence[Case], key: Callable[[Case], str]) -> list[list[Case]]:
    groups: dict[str, list[Case]] = {}
    for case in cases:
        groups.setdefault(key(case), []).append(case)
    return list(groups.values())


def _alternating(cases: list[Case], key: Callable[[Case], str]) -> list[Case]:
    return list(_alternating_lists(_groups(cases, key)))


def _alternating_lists(lists: list[list[Case]]) -> Iterator[Case]:
    return (case for case in chain.from_iterable(zip_longest(*lists)) if case is not None)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


@asynccontextmanager
async def in_process(api_key: str | None, timeout_s: float) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app built from the `ORCH_*` settings in this process, its models loaded (and closed after);
    `api_key` is sent as a bearer token, for settings that name `ORCH_API_KEYS`."""
    from orchestrator.api.app import create_app
    from orchestrator.settings import Settings

    app = create_app(Settings())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://in-process", headers=_headers(api_key), timeout=timeout_s
        ) as client:
            yield client


class ServiceUnreachable(RuntimeError):
    """The service at the URL did not answer its health check."""


@asynccontextmanager
async def at_url(url: str, api_key: str | None, timeout_s: float) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the service at `url` (its API key sent as a bearer token), checked with `GET /health`."""
    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=_headers(api_key), timeout=timeout_s) as client:
        try:
            health = await client.get("/health")
        except httpx.HTTPError as exc:
            raise ServiceUnreachable(f"{url} did not answer /health: {type(exc).__name__}: {exc}") from exc
        if health.status_code != 200:
            raise ServiceUnreachable(f"{url}/health answered {health.status_code}: {health.text[:200]}")
        yield client
