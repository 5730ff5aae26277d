"""A stage as its own OpenAI-compatible server: `create_stage_app(answers, errors, ...)`, which both stage servers
build on (`vision_stage.server`, `reasoning_stage.server`).

The app serves:

- `POST /v1/chat/completions`: `model` may be the served name, the backend's name (`stage_protocol.server.serving`),
  empty or missing, any other name is 404 `model_not_found`; then the stage's `StageAnswers` turns the request into
  its backend's call and the answer back: `complete` for a whole answer, `stream` for a streamed one (`stream:
  true`), whose first step is awaited before the response starts, so that a request the backend refuses or cannot
  serve still gets its HTTP status (`stage_protocol.server.events`);
- `GET /v1/models`: the served name and the backend's;
- `GET /health`: 200 while the backend can answer, 503 (with Retry-After) while it cannot.

Bodies over `max_body_bytes` are 413 (`stage_protocol.server.body_limit`); every error is OpenAI-shaped, with the
status the stage's `ErrorTable` gives it (`stage_protocol.server.errors`). The app owns the backend and closes it at
shutdown.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse

from stage_protocol.backend import Delta, StageBackend
from stage_protocol.server.body_limit import BodyLimit
from stage_protocol.server.errors import DEFAULT_RETRY_AFTER_S, ApiError, ErrorTable, Status, install_error_handlers
from stage_protocol.server.events import chat_events, event_stream, primed
from stage_protocol.server.openai import ChatCompletionRequest, Completion, Reply
from stage_protocol.server.serving import model_list, served_names, unknown_model

MODEL_NOT_FOUND = Status(404, "model_not_found")


class StageAnswers(Protocol):
    """How a stage answers a chat-completions request with its `backend`: whole, or as a stream of steps ending with
    the finish reason and token counts. Both raise `ApiError` for a request the stage cannot take, and the stage's
    own errors."""

    @property
    def backend(self) -> StageBackend: ...

    async def complete(self, body: ChatCompletionRequest) -> Completion: ...

    def stream(self, body: ChatCompletionRequest) -> AsyncIterator[Delta]: ...


@dataclass(frozen=True)
class StageService:
    answers: StageAnswers
    errors: ErrorTable[Any]
    model_name: str
    created: int

    @property
    def backend(self) -> StageBackend:
        return self.answers.backend

    @property
    def names(self) -> tuple[str, ...]:
        return served_names(self.model_name, self.backend.name)


def create_stage_app(
    answers: StageAnswers, errors: ErrorTable[Any], *, served_model_name: str, max_body_bytes: int
) -> FastAPI:
    """An app serving `answers` under `served_model_name` (module docstring); it owns their backend and closes it at
    shutdown. `errors.stage` names the app (`vision stage`) and the owner of its models."""
    backend = answers.backend

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await backend.aclose()

    app = FastAPI(title=f"{errors.stage} stage", lifespan=lifespan)
    app.state.service = StageService(answers, errors, served_model_name, int(time.time()))
    app.include_router(api)
    app.add_middleware(BodyLimit, max_body_bytes=max_body_bytes)
    install_error_handlers(app, errors.failure_of, (errors.root,))
    return app


def _service(request: Request) -> StageService:
    service: StageService = request.app.state.service
    return service


Service = Annotated[StageService, Depends(_service)]
api = APIRouter()


@api.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, service: Service) -> Response:
    unknown = unknown_model(body.model, service.names)
    if unknown is not None:
        raise ApiError(MODEL_NOT_FOUND, unknown, param="model")
    if not body.stream:
        answer = await service.answers.complete(body)
        return JSONResponse(Reply(service.model_name).completion(answer).to_dict(mode="json"))
    steps = await primed(service.answers.stream(body))
    reply = Reply(service.model_name)
    events = chat_events(reply, steps, include_usage=body.include_usage, on_error=service.errors.failure_of)
    return event_stream(events)


@api.get("/v1/models")
async def list_models(service: Service) -> dict[str, object]:
    return model_list(service.names, service.created, f"{service.errors.stage}_stage")


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
