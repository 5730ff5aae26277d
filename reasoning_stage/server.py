"""The reasoning stage as its own OpenAI-compatible server: `create_app(backend, served_model_name=...)`.

`POST /v1/chat/completions` takes system, user and assistant messages with text content (string or text parts; an
`image_url` part is 400 `image_not_supported`), and continues the chat with `ReasoningRequest(messages,
max_new_tokens=max_completion_tokens or max_tokens or the server's default, temperature)`. A missing `temperature`
means greedy decoding (0), not OpenAI's 1: answers are reproducible unless a client asks otherwise. Other sampling
fields and `chat_template_kwargs` are accepted and ignored. `model` may be the served name, the backend's name
(`stage_protocol.server.serving`), empty or missing; any other name is 404 `model_not_found`.

The model's thinking is `reasoning_content` (vLLM's field) on the message, or on the deltas when streaming. A
streamed answer (`stream: true`) comes from the backend's `stream` when it has one (`StreamingReasoningBackend`),
token by token; otherwise it is generated whole and sent as one delta. The first delta is awaited before the response
starts, so a request the backend refuses or cannot serve still gets its HTTP status; a failure after that is an
in-band error event followed by `[DONE]`. A client that disconnects closes the backend's stream, which stops the
generation. Usage comes from the backend's token counts.

Errors are OpenAI-shaped; `REASONING_ERRORS` maps every error of the reasoning stage to its status and code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse

from reasoning_stage import errors
from reasoning_stage.backend import ReasoningBackend, StreamingReasoningBackend
from reasoning_stage.types import ChatMessage, ReasoningDelta, ReasoningRequest
from stage_protocol.server.openai import (
    ApiError,
    BodyLimit,
    ChatCompletionRequest,
    Failure,
    MessageIn,
    Reply,
    Status,
    TextPart,
    chat_events,
    event_stream,
    install_error_handlers,
    primed,
)
from stage_protocol.server.serving import model_list, served_names, unknown_model

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_TOKENS = 256
DEFAULT_RETRY_AFTER_S = 5.0

REASONING_ERRORS: dict[type[errors.ReasoningError], Status] = {
    errors.ReasoningDisabled: Status(503, "reasoning_disabled"),
    errors.ReasoningUnavailable: Status(503, "reasoning_unavailable"),
    errors.ReasoningOverloaded: Status(503, "reasoning_overloaded"),
    errors.ReasoningRejected: Status(400, "reasoning_rejected"),
    errors.ReasoningInvalidOutput: Status(502, "reasoning_invalid_output"),
    errors.ReasoningModelError: Status(503, "reasoning_model_error"),
}
"""Every error of the reasoning stage's tree: its HTTP status and OpenAI `code` (a test checks every leaf is here)."""
INTERNAL_ERROR = Status(500, "internal_error")

MODEL_NOT_FOUND = Status(404, "model_not_found")
IMAGE_NOT_SUPPORTED = Status(400, "image_not_supported")


@dataclass(frozen=True)
class ReasoningService:
    backend: ReasoningBackend
    model_name: str
    default_max_tokens: int
    created: int


def create_app(
    backend: ReasoningBackend,
    *,
    served_model_name: str,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
) -> FastAPI:
    """An app serving `backend` under `served_model_name`; it owns the backend and closes it at shutdown.
    `default_max_tokens` is the completion budget of a request that sets neither `max_tokens` nor
    `max_completion_tokens`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await backend.aclose()

    app = FastAPI(title="reasoning stage", lifespan=lifespan)
    app.state.service = ReasoningService(backend, served_model_name, default_max_tokens, int(time.time()))
    app.include_router(api)
    app.add_middleware(BodyLimit, max_body_bytes=max_body_bytes)
    install_error_handlers(app, failure_of, (errors.ReasoningError,))
    return app


def failure_of(exc: Exception) -> Failure:
    """How `exc` is reported to the client; 5xx are logged, unknown errors with their traceback."""
    if isinstance(exc, ApiError):
        return Failure(exc.status, str(exc), exc.param)
    status = next((REASONING_ERRORS[cls] for cls in type(exc).__mro__ if cls in REASONING_ERRORS), None)
    if status is None:
        log.error("internal error: %s: %s", type(exc).__name__, exc, exc_info=exc)
        return Failure(INTERNAL_ERROR, "internal error in the reasoning stage server; see its log")
    if status.status >= 500:
        log.warning("reasoning backend failed: %s: %s", type(exc).__name__, exc)
    retry = (exc.retry_after_s or DEFAULT_RETRY_AFTER_S) if isinstance(exc, errors.ReasoningUnavailable) else None
    return Failure(status, str(exc), retry_after_s=retry)


def _service(request: Request) -> ReasoningService:
    service: ReasoningService = request.app.state.service
    return service


Service = Annotated[ReasoningService, Depends(_service)]
api = APIRouter()


@api.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, service: Service) -> Response:
    unknown = unknown_model(body.model, served_names(service.model_name, service.backend.name))
    if unknown is not None:
        raise ApiError(MODEL_NOT_FOUND, unknown, param="model")
    request = reasoning_request(body, service.default_max_tokens)
    reply = Reply(service.model_name)
    if not body.stream:
        result = await service.backend.generate(request)
        finish = ReasoningDelta(
            finish_reason=result.finish_reason,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
        )
        return JSONResponse(reply.completion(result.text, result.thinking, finish).to_dict(mode="json"))
    deltas = await primed(_deltas(service.backend, request))
    events = chat_events(reply, deltas, include_usage=body.include_usage, on_error=failure_of)
    return event_stream(events)


def _deltas(backend: ReasoningBackend, request: ReasoningRequest) -> AsyncIterator[ReasoningDelta]:
    if isinstance(backend, StreamingReasoningBackend):
        return backend.stream(request)
    return _generated(backend, request)


async def _generated(backend: ReasoningBackend, request: ReasoningRequest) -> AsyncIterator[ReasoningDelta]:
    """A backend that cannot stream: its whole answer as one delta."""
    result = await backend.generate(request)
    yield ReasoningDelta(
        text=result.text,
        thinking=result.thinking or "",
        finish_reason=result.finish_reason,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
    )


@api.get("/v1/models")
async def list_models(service: Service) -> dict[str, object]:
    names = served_names(service.model_name, service.backend.name)
    return model_list(names, service.created, "reasoning_stage")


@api.get("/health", response_model=None)
async def health(service: Service) -> JSONResponse:
    """200 while the backend can answer, 503 (with Retry-After) while it cannot."""
    state = await service.backend.health()
    body = {
        "status": "ok" if state.ok else "unavailable",
        "model": service.model_name,
        "backend": service.backend.name,
        "detail": state.detail,
    }
    headers = None if state.ok else {"Retry-After": str(round(DEFAULT_RETRY_AFTER_S))}
    return JSONResponse(body, status_code=200 if state.ok else 503, headers=headers)


def reasoning_request(body: ChatCompletionRequest, default_max_tokens: int) -> ReasoningRequest:
    messages = tuple(ChatMessage(m.role, _text_only(m, f"messages.{i}.content")) for i, m in enumerate(body.messages))
    return ReasoningRequest(
        messages,
        max_new_tokens=body.token_limit or default_max_tokens,
        temperature=body.temperature if body.temperature is not None else 0.0,
    )


def _text_only(message: MessageIn, param: str) -> str:
    if isinstance(message.content, list) and not all(isinstance(part, TextPart) for part in message.content):
        raise ApiError(IMAGE_NOT_SUPPORTED, "the reasoning stage reads text only: send no image_url parts", param=param)
    return message.text()
