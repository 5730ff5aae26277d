"""The HTTP endpoints: thin handlers over the pipeline. Every answer leaves through the output filter
(`orchestrator.security.output_filter`); the original write-ups' `/infer` and `/caption` are in
`orchestrator.api.legacy`.

A whole (not streamed) answer of `/v1/analyze` or `/v1/chat/completions` also says in headers whether it is degraded,
which mode ran and whether it needs human review (`OUTCOME_HEADERS`), for clients that drop fields they do not know;
a streamed one cannot, since its headers leave before these are known.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from orchestrator.analysis.types import AnalyzeOutcome, Options
from orchestrator.api import legacy
from orchestrator.api.chat_reply import (
    SSE_DONE,
    STREAM_EVENTS,
    ChatCompletionChunkOut,
    ChatCompletionOut,
    ChatReply,
    chat_events,
)
from orchestrator.api.chat_request import (
    ChatCompletionRequest,
    ModelListOut,
    ModelOut,
    model_list,
    model_out,
    not_applied,
    read_conversation,
    requested_mode,
)
from orchestrator.api.deps import ServicesDep
from orchestrator.api.events import analyze_events, event_stream
from orchestrator.api.inputs import read_analyze_request
from orchestrator.api.intake import IntakeDep
from orchestrator.api.render import analyze_response
from orchestrator.api.schemas import (
    ERROR_RESPONSES,
    FILE_PART,
    AnalyzeJsonRequest,
    AnalyzeResponse,
    AnalyzeStreamDone,
    ArbitrationEventOut,
    ErrorResponse,
    ReasoningDeltaOut,
    RouteOut,
    StreamErrorOut,
    VisionOut,
    form,
    request_body,
)
from orchestrator.stages.resilient import endpoint_statuses
from reasoning_stage.backend import ReasoningBackend
from vision_stage.backend import VisionBackend

api = APIRouter()

MAX_MODEL_NAME = 256
OUTCOME_HEADERS = ("X-Orchestrator-Degraded", "X-Orchestrator-Mode", "X-Orchestrator-Needs-Human-Review")

_CHAT_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    404: {"model": ErrorResponse, "description": "No such model (`not_found`); `GET /v1/models` lists them"},
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json_data(schema: dict[str, Any]) -> dict[str, Any]:
    """An event's `data` field: one line of JSON matching `schema`."""
    return {"type": "string", "contentMediaType": "application/json", "contentSchema": schema}


def _named_events(events: dict[str, type[BaseModel]]) -> dict[str, Any]:
    """Each event of a stream (OpenAPI 3.1: the event-stream `schema` describes one event): `event` names it, and
    `data` is JSON of that event's schema."""
    return {
        "type": "object",
        "required": ["event", "data"],
        "oneOf": [
            {"properties": {"event": {"const": name}, "data": _json_data(_ref(model))}}
            for name, model in events.items()
        ],
    }


def _unnamed_events(models: tuple[type[BaseModel], ...], last: str) -> dict[str, Any]:
    """Each event of a stream whose events are not named: `data` is JSON of one of `models`, or the literal `last`."""
    data = {"oneOf": [{"const": last}, _json_data({"oneOf": [_ref(model) for model in models]})]}
    return {"type": "object", "required": ["data"], "properties": {"data": data}}


def _event_stream(description: str, events: dict[str, type[BaseModel]], schema: dict[str, Any]) -> dict[str, Any]:
    """A 200 that is JSON or, streamed, `text/event-stream`: `schema` describes each event, and `x-events` names the
    schema of each event's data."""
    return {
        "description": description,
        "content": {
            "text/event-stream": {"schema": schema, "x-events": {name: _ref(model) for name, model in events.items()}}
        },
    }


_ANALYZE_EVENTS: dict[str, type[BaseModel]] = {
    "route": RouteOut,
    "vision": VisionOut,
    "reasoning": ReasoningDeltaOut,
    "arbitration": ArbitrationEventOut,
    "error": StreamErrorOut,
    "done": AnalyzeStreamDone,
}
SCHEMA_MODELS: tuple[type[BaseModel], ...] = (
    AnalyzeJsonRequest,
    ChatCompletionRequest,
    legacy.InferRequest,
    *_ANALYZE_EVENTS.values(),
    *STREAM_EVENTS.values(),
    ChatCompletionChunkOut,
)
"""Models the OpenAPI description refers to that no handler declares (bodies read by hand, stream events); the app
adds them to its components."""

_ANALYZE_FIELDS: dict[str, Any] = {
    "image": FILE_PART,
    "question": {"type": "string"},
    "mode": {"type": "string", "enum": ["auto", "vision", "reasoning"], "default": "auto"},
    "profile": {"type": "string", "enum": ["general", "medical", "legal", "finance"], "default": "general"},
    "response_format": {"type": "string", "enum": ["text", "json"], "default": "text"},
    "stream": {"type": "boolean", "default": False},
}
_ANALYZE_BODY = request_body(
    **{"multipart/form-data": form(["image", "question"], _ANALYZE_FIELDS),
       "application/json": {"schema": _ref(AnalyzeJsonRequest)}}
)  # fmt: skip
_CHAT_BODY = request_body(**{"application/json": {"schema": _ref(ChatCompletionRequest)}})


class HealthResponse(BaseModel):
    status: str


class EndpointReadiness(BaseModel):
    endpoint: str = Field(description="The endpoint's base URL, or the in-process backend's name.")
    breaker: Literal["closed", "open", "half_open"] = Field(description="Its circuit breaker's state.")
    retry_in_s: float = Field(description="Seconds until an open breaker lets a trial call through.")
    in_flight: int = Field(description="Calls to it under way.")


class StageReadiness(BaseModel):
    backend: str
    model: str
    ok: bool
    detail: str
    endpoints: list[EndpointReadiness] = Field(
        description="Each endpoint behind the stage (a fallback's after the primary's), with its circuit breaker."
    )


class ReadyResponse(BaseModel):
    ready: bool
    vision: StageReadiness
    reasoning: StageReadiness


@api.get("/health", response_model=HealthResponse, summary="The process is alive")
async def health() -> HealthResponse:
    return HealthResponse(status="ok")


@api.get(
    "/ready",
    response_model=ReadyResponse,
    summary="Models loaded and stages healthy",
    responses={503: {"model": ReadyResponse, "description": "Not ready; see each stage's detail"}},
)
async def ready(services: ServicesDep) -> JSONResponse:
    backends = services.backends
    vision_health, reasoning_health = await asyncio.gather(backends.vision.health(), backends.reasoning.health())
    body = ReadyResponse(
        ready=vision_health.ok and reasoning_health.ok,
        vision=_readiness(backends.vision, vision_health.ok, vision_health.detail),
        reasoning=_readiness(backends.reasoning, reasoning_health.ok, reasoning_health.detail),
    )
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


def _readiness(backend: VisionBackend | ReasoningBackend, ok: bool, detail: str) -> StageReadiness:
    endpoints = [EndpointReadiness(**vars(status)) for status in endpoint_statuses(backend)]
    return StageReadiness(backend=backend.name, model=backend.model, ok=ok, detail=detail, endpoints=endpoints)


@api.post(
    "/v1/analyze",
    response_model=AnalyzeResponse,
    responses={
        **ERROR_RESPONSES,
        404: {
            "model": ErrorResponse,
            "description": "A `session_id` with no live session for this caller (`session_not_found`)",
        },
        200: _event_stream(
            "The answer; with `stream: true`, the analysis as events", _ANALYZE_EVENTS, _named_events(_ANALYZE_EVENTS)
        ),
    },
    openapi_extra=_ANALYZE_BODY,
    summary="Answer a question about an image",
    description="Multipart (`image` file, `question`, `mode`, `profile`, `response_format`, `stream`) or JSON "
    "(`image_base64` or a `data:` or http(s) `image_url`, `question`, `mode`, `profile`, `response_format`, "
    "`stream`). With `stream: true` the answer is a stream of server-sent events, which starts once the vision stage "
    "has answered. Every answer carries a `session_id`: send it instead of the image to ask about the same image "
    "again.",
)
async def analyze(response: Response, intake: IntakeDep) -> Response | AnalyzeResponse:
    inputs = await read_analyze_request(intake.request, intake.services.settings.limits.max_image_bytes)
    asked = inputs.options
    question = intake.question(asked.question)
    options = Options(mode=asked.mode, profile=asked.profile, response_format=asked.response_format)
    if inputs.image is None:
        prepared = await intake.resume(asked.session_id or "", question, options)
    else:
        prepared = await intake.prepare(question, inputs.image, options, image_url=inputs.image_url, session=True)
    session_id = prepared.session.id if prepared.session else None
    if asked.stream:
        return event_stream(analyze_events(await intake.stream(prepared), intake.request_id, session_id))
    outcome = await intake.run(prepared)
    response.headers.update(outcome_headers(outcome))
    return analyze_response(outcome, intake.request_id, session_id)


def outcome_headers(outcome: AnalyzeOutcome) -> dict[str, str]:
    """`OUTCOME_HEADERS`' values for a whole answer."""
    values = (str(outcome.degraded).lower(), outcome.mode, str(outcome.needs_human_review).lower())
    return dict(zip(OUTCOME_HEADERS, values, strict=True))


@api.post(
    "/v1/chat/completions",
    response_model=ChatCompletionOut,
    responses={
        **_CHAT_ERRORS,
        200: _event_stream(
            "The answer; with `stream: true`, chunks, then `data: [DONE]`",
            STREAM_EVENTS,
            _unnamed_events(tuple(STREAM_EVENTS.values()), SSE_DONE.removeprefix("data: ").strip()),
        ),
    },
    openapi_extra=_CHAT_BODY,
    summary="OpenAI-compatible chat completions about an image",
    description="The official `openai` client works unchanged. `model` is the route (`auto`, `vision-only`, "
    "`vision-then-reasoning`); the last message is the user's question, the most recent `image_url` part (a "
    "`data:` or http(s) URL) the image; the answer carries how it was reached in the extra field `orchestration`.",
)
async def chat_completions(intake: IntakeDep) -> Response:
    body = await intake.body(ChatCompletionRequest)
    body.refuse_unsupported()
    mode = requested_mode(body.model)
    conversation = read_conversation([message.read() for message in body.messages])
    question = intake.question(conversation.question, f"messages.{len(body.messages) - 1}.content")
    source = await intake.image_at(conversation.image_url)
    options = Options(
        mode=mode, profile=body.profile, response_format=body.answer_format, history=conversation.history,
        max_new_tokens=body.token_limit, temperature=body.reasoning_temperature, sampling=body.sampling,
    )  # fmt: skip
    prepared = await intake.prepare(question, source.data, options, image_url=source.url)
    reply = ChatReply(body.model, intake.request_id, not_applied(body.sampling, intake.services.settings.reasoning))
    if body.stream:
        return event_stream(chat_events(await intake.stream(prepared), reply, include_usage=body.include_usage))
    outcome = await intake.run(prepared)
    completion = reply.completion(outcome)
    return Response(completion.model_dump_json(), media_type="application/json", headers=outcome_headers(outcome))


@api.get("/v1/models", response_model=ModelListOut, summary="The model names of `/v1/chat/completions`: its routes")
async def list_models(request: Request) -> ModelListOut:
    return model_list(int(request.app.state.started))


@api.get(
    "/v1/models/{model}",
    response_model=ModelOut,
    responses={
        404: {"model": ErrorResponse, "description": "No such model (`not_found`)"},
        422: {"model": ErrorResponse, "description": "A model name longer than any (`validation_error`)"},
    },
    summary="One model name of `/v1/chat/completions`: a route",
)
async def retrieve_model(model: Annotated[str, Path(max_length=MAX_MODEL_NAME)], request: Request) -> ModelOut:
    return model_out(model, int(request.app.state.started))


api.include_router(legacy.api)
