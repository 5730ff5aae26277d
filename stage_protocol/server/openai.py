"""The OpenAI chat-completions wire format as both stage servers speak it (the server half of what the stages share).

Requests are read by the small pydantic model below (what clients send: text and `image_url` parts, token limits,
`stream`, `stream_options`, vLLM's `chat_template_kwargs`; other fields are accepted and ignored, as vLLM does).
Responses are the `openai` package's own pydantic models. Errors have OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`; a failure after a stream has started is sent in-band as
`data: {"error": {...}}`, followed by `data: [DONE]`, so a client never mistakes a cut stream for a finished one.

A streamed answer is a series of `Step`s: the vision server builds `Piece`s, the reasoning server passes its
backend's `ReasoningDelta`s, which have the same fields.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, NamedTuple, Protocol, TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat import chat_completion as completion_types
from openai.types.chat import chat_completion_chunk as chunk_types
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

T = TypeVar("T")
FinishReason = Literal["stop", "length"]
SSE_DONE = "data: [DONE]\n\n"


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    url: str
    detail: str | None = None


class ImageUrlPart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImageUrlPart, Field(discriminator="type")]


class MessageIn(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """The message's text: the string content, or its text parts joined by newlines."""
        if not isinstance(self.content, list):
            return self.content or ""
        return "\n".join(part.text for part in self.content if isinstance(part, TextPart))

    def image_urls(self) -> list[str]:
        parts = self.content if isinstance(self.content, list) else []
        return [part.image_url.url for part in parts if isinstance(part, ImageUrlPart)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """A chat-completions request. Sampling fields other than `temperature` are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[MessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = None
    n: int = 1
    seed: int | None = None
    user: str | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported: this server returns one choice")
        return n

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class Status(NamedTuple):
    """An HTTP status and the stable OpenAI `code` slug that goes with it."""

    status: int
    code: str


INCOMPLETE_STREAM = Status(502, "incomplete_stream")


class ApiError(Exception):
    """A request the server refuses before any backend sees it."""

    def __init__(self, status: Status, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


@dataclass(frozen=True)
class Failure:
    """An error as the client gets it: status and code, message, the offending parameter, when to retry."""

    status: Status
    message: str
    param: str | None = None
    retry_after_s: float | None = None

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status.code}}

    def response(self) -> JSONResponse:
        retry = self.retry_after_s
        headers = {"Retry-After": str(max(1, round(retry)))} if retry is not None else None
        return JSONResponse(self.body(), status_code=self.status.status, headers=headers)


INVALID_REQUEST = Status(400, "invalid_request")
INVALID_JSON = Status(400, "invalid_json")
REQUEST_TOO_LARGE = Status(413, "request_too_large")
HTTP_STATUSES = {404: "not_found", 405: "method_not_allowed", 413: REQUEST_TOO_LARGE.code}


def install_error_handlers(
    app: FastAPI, failure_of: Callable[[Exception], Failure], roots: tuple[type[Exception], ...]
) -> None:
    """Every error becomes an OpenAI-shaped JSON response: request validation (400), Starlette's HTTP errors (404,
    405, 413 for a body over the limit) and, through `failure_of`, `ApiError`, the stage's `roots` and the rest."""

    async def on_error(request: Request, exc: Exception) -> Response:
        return failure_of(exc).response()

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return validation_failure(exc.errors()).response()

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = HTTP_STATUSES.get(exc.status_code, "http_error")
        return Failure(Status(exc.status_code, code), str(exc.detail)).response()

    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    handled: tuple[type[Exception], ...] = (ApiError, *roots, Exception)
    for root in handled:  # `Exception` is served by Starlette's last resort, which then re-raises it to the server
        app.add_exception_handler(root, on_error)


def validation_failure(errors: Sequence[Any]) -> Failure:
    """A body that is not JSON (400 `invalid_json`) or does not fit the request model (400 `invalid_request`, `param`
    naming the first offending field, as `messages.0.role`)."""
    if any(error["type"] == "json_invalid" for error in errors):
        return Failure(INVALID_JSON, f"the body is not valid JSON: {errors[0].get('ctx', {}).get('error')}")
    fields = [".".join(str(part) for part in error["loc"] if part != "body") for error in errors]
    message = "; ".join(f"{field or 'body'}: {error['msg']}" for field, error in zip(fields, errors, strict=True))
    return Failure(INVALID_REQUEST, message, (fields[0] or None) if fields else None)


class BodyLimit:
    """ASGI middleware refusing a body over `max_body_bytes` with an OpenAI-shaped 413: a declared Content-Length
    before anything is read, a chunked body as soon as it grows past the limit (through the handler of
    Starlette's `HTTPException`). FastAPI's own `max_body_size` answers the first case in plain text."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            message = f"the body has {declared} bytes; the limit is {self.max_body_bytes}"
            await Failure(REQUEST_TOO_LARGE, message).response()(scope, receive, send)
            return
        await self.app(scope, self._capped(receive), send)

    def _capped(self, receive: Receive) -> Receive:
        seen = 0

        async def capped_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b"")) if message["type"] == "http.request" else 0
            if seen > self.max_body_bytes:
                raise StarletteHTTPException(413, f"the body is larger than the limit of {self.max_body_bytes} bytes")
            return message

        return capped_receive


class Step(Protocol):
    """One step of an answer, as `chat_events` reads it: text, or thinking, or (last) the finish reason and token
    counts."""

    @property
    def text(self) -> str: ...
    @property
    def thinking(self) -> str: ...
    @property
    def finish_reason(self) -> FinishReason | None: ...
    @property
    def prompt_tokens(self) -> int | None: ...
    @property
    def completion_tokens(self) -> int | None: ...


S = TypeVar("S", bound=Step)


@dataclass(frozen=True)
class Piece:
    """A `Step` built by a server whose backend does not stream its own (the vision stage's)."""

    text: str = ""
    thinking: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(frozen=True)
class Reply:
    """What the completion or every chunk of one response shares: its id, creation time and model name."""

    model: str
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def completion(self, text: str, thinking: str | None, finish: Step) -> ChatCompletion:
        message = ChatCompletionMessage(role="assistant", content=text, reasoning_content=thinking)
        choice = completion_types.Choice(index=0, message=message, finish_reason=finish.finish_reason or "stop")
        return ChatCompletion(
            id=self.id,
            choices=[choice],
            created=self.created,
            model=self.model,
            object="chat.completion",
            usage=usage(finish),
        )

    def chunk(self, delta: chunk_types.ChoiceDelta, finish_reason: FinishReason | None = None) -> str:
        choice = chunk_types.Choice(index=0, delta=delta, finish_reason=finish_reason)
        return self._event(self._chunk([choice]))

    def usage_chunk(self, finish: Step) -> str:
        """The last chunk when `stream_options.include_usage` is set: no choices, the usage of the whole answer."""
        chunk = self._chunk([])
        chunk.usage = usage(finish)
        return self._event(chunk)

    def _chunk(self, choices: list[chunk_types.Choice]) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, choices=choices, created=self.created, model=self.model, object="chat.completion.chunk"
        )

    @staticmethod
    def _event(chunk: ChatCompletionChunk) -> str:
        return f"data: {chunk.to_json(indent=None)}\n\n"


def usage(finish: Step) -> CompletionUsage:
    prompt, completion = finish.prompt_tokens or 0, finish.completion_tokens or 0
    return CompletionUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def chat_events(
    reply: Reply, pieces: AsyncIterator[Step], *, include_usage: bool, on_error: Callable[[Exception], Failure]
) -> AsyncIterator[str]:
    """The SSE events of a streamed answer: the role, thinking and text deltas, the finish reason, the usage chunk
    when asked for, and `[DONE]`. An error while streaming (a stream that ends without a finish reason included)
    becomes an in-band `{"error": ...}` event before `[DONE]`."""
    yield reply.chunk(chunk_types.ChoiceDelta(role="assistant", content=""))
    try:
        async with closing(pieces):
            async for piece in pieces:
                if piece.thinking:
                    yield reply.chunk(chunk_types.ChoiceDelta(reasoning_content=piece.thinking))
                if piece.text or piece.finish_reason:
                    yield reply.chunk(chunk_types.ChoiceDelta(content=piece.text or None), piece.finish_reason)
                if piece.finish_reason:
                    if include_usage:
                        yield reply.usage_chunk(piece)
                    break
            else:
                raise ApiError(INCOMPLETE_STREAM, "the backend's answer ended without a finish reason")
    except Exception as exc:
        yield f"data: {json.dumps(on_error(exc).body(), ensure_ascii=False)}\n\n"
    yield SSE_DONE


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    """`events` as a `text/event-stream` response that proxies neither cache nor buffer."""
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


async def primed(pieces: AsyncIterator[S]) -> AsyncIterator[S]:
    """`pieces` with its first item already taken, so errors raised before the answer starts raise here, while an
    HTTP status can still say so. Iterate the returned iterator to get every item, the first included."""
    first = await anext(pieces, None)
    if first is None:
        raise ApiError(INCOMPLETE_STREAM, "the backend's answer was empty: it ended before its first piece")

    async def chained() -> AsyncIterator[S]:
        async with closing(pieces):
            yield first
            async for piece in pieces:
                yield piece

    return chained()


@asynccontextmanager
async def closing(iterator: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """Close `iterator` on leaving (an async generator's `aclose`), so an abandoned answer stops being generated."""
    try:
        yield iterator
    finally:
        close = getattr(iterator, "aclose", None)
        if close is not None:
            await close()
