"""The reasoning stage as its own OpenAI-compatible server: `create_app(backend, served_model_name=...)`.

`POST /v1/chat/completions` takes system, user and assistant messages with text content (string or text parts; an
`image_url` part is 400 `image_not_supported`), and continues the chat with `ReasoningRequest(messages,
max_new_tokens=max_completion_tokens or max_tokens or the server's default, temperature)`. A missing `temperature`
means greedy decoding (0), not OpenAI's 1: answers are reproducible unless a client asks otherwise. Other sampling
fields and `chat_template_kwargs` are accepted and ignored.

The model's thinking is `reasoning_content` (vLLM's field) on the message, or on the deltas when streaming. A
streamed answer (`stream: true`) comes from the backend's `stream` when it has one (`StreamingReasoningBackend`),
token by token; otherwise it is generated whole and sent as one delta. The first delta is awaited before the response
starts, so a request the backend refuses or cannot serve still gets its HTTP status; a failure after that is an
in-band error event followed by `[DONE]`. A client that disconnects closes the backend's stream, which stops the
generation. Usage comes from the backend's token counts.

What both stage servers share (the names served, `GET /v1/models`, `GET /health`, the body limit, OpenAI-shaped
errors, streaming) is `stage_protocol.server.app`'s; `REASONING_ERRORS` maps every error of the reasoning stage to its
status and code.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI

from reasoning_stage import errors
from reasoning_stage.backend import ReasoningBackend, StreamingReasoningBackend
from reasoning_stage.types import ChatMessage, ReasoningDelta, ReasoningRequest
from stage_protocol.server.app import create_stage_app
from stage_protocol.server.errors import ApiError, ErrorTable, Status
from stage_protocol.server.openai import ChatCompletionRequest, Completion, MessageIn, TextPart

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_TOKENS = 256

REASONING_ERRORS: dict[type[errors.ReasoningError], Status] = {
    errors.ReasoningDisabled: Status(503, "reasoning_disabled"),
    errors.ReasoningUnavailable: Status(503, "reasoning_unavailable"),
    errors.ReasoningOverloaded: Status(503, "reasoning_overloaded"),
    errors.ReasoningRejected: Status(400, "reasoning_rejected"),
    errors.ReasoningInvalidOutput: Status(502, "reasoning_invalid_output"),
    errors.ReasoningModelError: Status(503, "reasoning_model_error"),
}
"""Every error of the reasoning stage's tree: its HTTP status and OpenAI `code` (a test checks every leaf is here)."""
ERRORS = ErrorTable("reasoning", errors.ReasoningError, REASONING_ERRORS, log)

IMAGE_NOT_SUPPORTED = Status(400, "image_not_supported")


def create_app(
    backend: ReasoningBackend,
    *,
    served_model_name: str,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
) -> FastAPI:
    """An app serving `backend` under `served_model_name` (`stage_protocol.server.app`); it owns the backend and
    closes it at shutdown. `default_max_tokens` is the completion budget of a request that sets neither `max_tokens`
    nor `max_completion_tokens`."""
    answers = ReasoningAnswers(backend, default_max_tokens)
    return create_stage_app(answers, ERRORS, served_model_name=served_model_name, max_body_bytes=max_body_bytes)


@dataclass(frozen=True)
class ReasoningAnswers:
    """The chat continued by the backend (module docstring): streamed by its own `stream` when it has one."""

    backend: ReasoningBackend
    default_max_tokens: int

    async def complete(self, body: ChatCompletionRequest) -> Completion:
        result = await self.backend.generate(reasoning_request(body, self.default_max_tokens))
        return Completion(
            result.text, result.thinking, result.finish_reason, result.prompt_tokens, result.completion_tokens
        )

    def stream(self, body: ChatCompletionRequest) -> AsyncIterator[ReasoningDelta]:
        request = reasoning_request(body, self.default_max_tokens)
        if isinstance(self.backend, StreamingReasoningBackend):
            return self.backend.stream(request)
        return _generated(self.backend, request)


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
