"""Server-sent events: the events of `POST /v1/analyze` with `stream: true`, and what every streamed endpoint shares.

A streamed response starts only once the vision stage has answered (`started`): until then a failure (a bad image,
the vision stage down) still gets its HTTP status and JSON error body, like an unstreamed request. After that, an
error is an in-band event, never a silently cut stream.

The analyze events, each `event: NAME` with one JSON `data:` line, in order (docs/api.md "Streaming"):

| event         | data                     | when                                                              |
| ------------- | ------------------------ | ----------------------------------------------------------------- |
| `route`       | `RouteOut`               | first                                                             |
| `vision`      | `VisionOut`              | the vision stage's result                                         |
| `reasoning`   | `ReasoningDeltaOut`      | each piece of the reasoning stage's answer (or thinking)          |
| `error`       | `StreamErrorOut`         | a failure after the start; with `failure`, `done` still follows   |
| `arbitration` | `ArbitrationEventOut`    | the complete reasoning answer checked against the image           |
| `done`        | `AnalyzeStreamDone`      | last: the whole `/v1/analyze` response                            |
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import assert_never

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from orchestrator.analysis.types import (
    ArbitrationEvent,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    PipelineEvent,
    RouteEvent,
    VisionEvent,
)
from orchestrator.api.render import analyze_response, arbitration_out, vision_out
from orchestrator.api.schemas import (
    AnalyzeStreamDone,
    ArbitrationEventOut,
    ErrorBody,
    FailureOut,
    ReasoningDeltaOut,
    RouteOut,
    StreamErrorOut,
)
from orchestrator.errors import ErrorSpec, spec_for

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error; the request id is in the log"


def describe_error(exc: BaseException, request_id: str) -> tuple[ErrorSpec, str]:
    """The status, slug and client-facing message of `exc`; 5xx are logged, internal errors with their traceback
    and without their details in the message."""
    spec = spec_for(exc)
    if spec.status >= 500:
        log.error("request %s failed: %s: %s", request_id, type(exc).__name__, exc, exc_info=exc)
    return spec, (str(exc) if spec.type != "internal_error" else INTERNAL_MESSAGE)


def error_body(exc: BaseException, request_id: str) -> ErrorBody:
    spec, message = describe_error(exc, request_id)
    return ErrorBody(type=spec.type, message=message, request_id=request_id)


def stage_error_body(event: ErrorEvent, request_id: str) -> ErrorBody:
    """The in-band error of a stage that failed mid-answer: its slug, the stage and backend named."""
    failure = event.failure
    message = f"the {failure.stage} stage (backend {failure.backend}) failed mid-answer: {failure.message}"
    return ErrorBody(type=spec_for(event.error).type, message=message, request_id=request_id)


def sse(data: BaseModel, event: str | None = None, *, exclude_unset: bool = False) -> str:
    """One server-sent event: `data` as one line of JSON, named `event` when given."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data.model_dump_json(exclude_unset=exclude_unset)}\n\n"


async def started(events: AsyncGenerator[PipelineEvent, None]) -> AsyncGenerator[PipelineEvent, None]:
    """`events` with everything up to the vision stage's result already taken, so that what fails before it raises
    here, while the response can still say so with its status. Iterate the result for every event, those included."""
    head: list[PipelineEvent] = []
    try:
        async for event in events:
            head.append(event)
            if isinstance(event, VisionEvent | DoneEvent):
                break
    except BaseException:
        await events.aclose()
        raise

    async def chained() -> AsyncGenerator[PipelineEvent, None]:
        async with aclosing(events):
            for event in head:
                yield event
            async for event in events:
                yield event

    return chained()


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    """`events` as a `text/event-stream` response that proxies neither cache nor buffer."""
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


async def analyze_events(
    events: AsyncGenerator[PipelineEvent, None], request_id: str, session_id: str | None = None
) -> AsyncGenerator[str, None]:
    """The analyze stream: each pipeline event as its SSE event; a failure as a last `error` event."""
    try:
        async with aclosing(events):
            async for event in events:
                yield analyze_event(event, request_id, session_id)
    except Exception as exc:
        yield sse(StreamErrorOut(error=error_body(exc, request_id), failure=None), "error")


def analyze_event(event: PipelineEvent, request_id: str, session_id: str | None = None) -> str:
    """One pipeline event as the analyze stream's SSE event (module docstring)."""
    match event:
        case RouteEvent(route=route):
            return sse(RouteOut(**vars(route)), "route")
        case VisionEvent(vision=vision):
            return sse(vision_out(vision), "vision")
        case DeltaEvent(text=text, thinking=thinking):
            return sse(ReasoningDeltaOut(text=text, thinking=thinking), "reasoning")
        case ErrorEvent():
            failure = FailureOut(**vars(event.failure))
            return sse(StreamErrorOut(error=stage_error_body(event, request_id), failure=failure), "error")
        case ArbitrationEvent():
            arbitration = event.arbitration
            checked = arbitration_out(
                arbitration, model=ArbitrationEventOut, answer=event.answer, replaced=event.replaced
            )
            return sse(checked, "arbitration")
        case DoneEvent():
            done = analyze_response(
                event.outcome, request_id, session_id, model=AnalyzeStreamDone, replaced=event.replaced
            )
            return sse(done, "done")
        case _:
            assert_never(event)
