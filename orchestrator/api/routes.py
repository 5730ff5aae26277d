"""The HTTP endpoints: thin handlers over the pipeline."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from orchestrator.analysis import AnalyzeInput, Routed
from orchestrator.answer_json import ResponseFormat
from orchestrator.api.deps import Services, ServicesDep
from orchestrator.api.events import analyze_events, event_stream, started
from orchestrator.api.inputs import decode_data_url, read_analyze_request, read_json_request
from orchestrator.api.openai_compat import (
    STREAM_EVENTS,
    ChatCompletionChunkOut,
    ChatCompletionOut,
    ChatCompletionRequest,
    ChatReply,
    ModelListOut,
    chat_events,
    model_list,
    read_conversation,
    requested_mode,
)
from orchestrator.api.schemas import (
    AnalyzeJsonRequest,
    AnalyzeResponse,
    AnalyzeStreamDone,
    ArbitrationEventOut,
    ErrorResponse,
    ReasoningDeltaOut,
    RouteOut,
    StreamErrorOut,
    VisionOut,
    analyze_response,
)
from orchestrator.errors import ValidationFailed
from orchestrator.resilience.backends import endpoint_statuses
from orchestrator.routing import RequestedMode
from orchestrator.settings import LimitSettings
from reasoning_stage.backend import ReasoningBackend
from vision_stage.backend import VisionBackend
from vision_stage.images import ImageLimits, decode_image
from vision_stage.types import DecodedImage

api = APIRouter()

_ERROR_STATUSES: dict[int, str] = {
    400: "Malformed request or image (`image_missing`, `invalid_base64`, `invalid_data_url`, `invalid_json`, "
    "`invalid_multipart`, `image_url_not_supported`, `image_empty`, `image_corrupt`)",
    413: "Too large (`request_too_large`, `image_too_large`, `image_too_many_pixels`)",
    415: "Not an accepted image or body type (`image_unsupported`, `unsupported_media_type`)",
    422: "Missing, invalid or unknown fields (`validation_error`)",
    502: "The vision stage answered something unusable (`vision_invalid_output`, `vision_rejected`)",
    503: "Not ready, or the vision stage is unavailable (`not_ready`, `vision_unavailable`); see Retry-After",
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description} for status, description in _ERROR_STATUSES.items()
}
_CHAT_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    404: {"model": ErrorResponse, "description": "No such model (`not_found`); `GET /v1/models` lists them"},
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _event_stream(description: str, events: dict[str, type[BaseModel]]) -> dict[str, Any]:
    """A 200 that is JSON or, streamed, `text/event-stream`; `x-events` names the schema of each event's data."""
    return {
        "description": description,
        "content": {
            "text/event-stream": {
                "schema": {"type": "string"},
                "x-events": {name: _ref(model) for name, model in events.items()},
            }
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
    *_ANALYZE_EVENTS.values(),
    *STREAM_EVENTS.values(),
    ChatCompletionChunkOut,
)
"""Models the OpenAPI description refers to that no handler declares (bodies read by hand, stream events); the app
adds them to its components."""

_ANALYZE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "question"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "question": {"type": "string"},
                        "mode": {"type": "string", "enum": ["auto", "vision", "reasoning"], "default": "auto"},
                        "profile": {
                            "type": "string",
                            "enum": ["general", "medical", "legal", "finance"],
                            "default": "general",
                        },
                        "response_format": {"type": "string", "enum": ["text", "json"], "default": "text"},
                        "stream": {"type": "boolean", "default": False},
                    },
                }
            },
            "application/json": {"schema": _ref(AnalyzeJsonRequest)},
        },
    }
}
_CHAT_BODY: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(ChatCompletionRequest)}}}
}


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
        **_ERRORS,
        200: _event_stream("The answer; with `stream: true`, the analysis as events", _ANALYZE_EVENTS),
    },
    openapi_extra=_ANALYZE_BODY,
    summary="Answer a question about an image",
    description="Multipart (`image` file, `question`, `mode`, `profile`, `response_format`, `stream`) or JSON "
    "(`image_base64` or a `data:` `image_url`, `question`, `mode`, `profile`, `response_format`, `stream`). With "
    "`stream: true` the answer is a stream of server-sent events, which starts once the vision stage has answered.",
)
async def analyze(request: Request, services: ServicesDep) -> Response | AnalyzeResponse:
    limits = services.settings.limits
    inputs = await read_analyze_request(request, limits.max_image_bytes)
    options = inputs.options
    question = _question(options.question, limits)
    image, routed = await _decode_and_route(services, inputs.image, question, options.mode, options.response_format)
    analysis = AnalyzeInput(
        image, question, mode=options.mode, profile=options.profile, response_format=options.response_format
    )
    if options.stream:
        events = await started(services.pipeline.stream(analysis, routed))
        return event_stream(analyze_events(events, _request_id(request)))
    outcome = await services.pipeline.run(analysis, routed)
    return analyze_response(outcome, _request_id(request))


@api.post(
    "/v1/chat/completions",
    response_model=ChatCompletionOut,
    responses={
        **_CHAT_ERRORS,
        200: _event_stream("The answer; with `stream: true`, chunks, then `data: [DONE]`", STREAM_EVENTS),
    },
    openapi_extra=_CHAT_BODY,
    summary="OpenAI-compatible chat completions about an image",
    description="The official `openai` client works unchanged. `model` is the route (`auto`, `vision-only`, "
    "`vision-then-reasoning`); the last message is the user's question, the most recent `image_url` part (a "
    "`data:` URL) the image; the answer carries how it was reached in the extra field `orchestration`.",
)
async def chat_completions(request: Request, services: ServicesDep) -> Response:
    body = await read_json_request(request, ChatCompletionRequest)
    mode = requested_mode(body.model)
    conversation = read_conversation(body.messages)
    limits = services.settings.limits
    question = _question(conversation.question, limits, f"messages.{len(body.messages) - 1}.content")
    data = decode_data_url(conversation.image_url, limits.max_image_bytes)
    image, routed = await _decode_and_route(services, data, question, mode, body.answer_format)
    analysis = AnalyzeInput(
        image, question, mode=mode, profile=body.profile, response_format=body.answer_format,
        history=conversation.history, max_new_tokens=body.token_limit, temperature=body.temperature,
    )  # fmt: skip
    reply = ChatReply(body.model, _request_id(request))
    if body.stream:
        events = await started(services.pipeline.stream(analysis, routed))
        return event_stream(chat_events(events, reply, include_usage=body.include_usage))
    outcome = await services.pipeline.run(analysis, routed)
    return JSONResponse(reply.completion(outcome).model_dump(mode="json"))


@api.get("/v1/models", response_model=ModelListOut, summary="The model names of `/v1/chat/completions`: its routes")
async def list_models(request: Request) -> ModelListOut:
    return model_list(int(request.app.state.started))


def _question(text: str, limits: LimitSettings, name: str = "question") -> str:
    question = text.strip()
    if not question:
        raise ValidationFailed(f"{name}: the question must not be blank")
    if len(question) > limits.max_question_chars:
        raise ValidationFailed(f"{name}: {len(question)} characters; the limit is {limits.max_question_chars}")
    return question


async def _decode_and_route(
    services: Services, data: bytes, question: str, mode: RequestedMode, response_format: ResponseFormat
) -> tuple[DecodedImage, Routed]:
    limits = services.settings.limits
    image_limits = ImageLimits(max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels)
    # Route while the image decodes, both off the event loop: routing then adds only what outlasts the decoding.
    routing = asyncio.create_task(services.pipeline.route(question, mode, response_format))
    try:
        image = await asyncio.to_thread(decode_image, data, image_limits)
    finally:
        routed = await routing  # never cancelled mid-query: a bad image waits for at most one routing call
    return image, routed


def _request_id(request: Request) -> str:
    return str(request.scope["state"]["request_id"])
