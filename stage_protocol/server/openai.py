"""The OpenAI chat-completions wire format as both stage servers speak it: the request model, and the completion and
chunks of an answer.

Requests are read by the small pydantic model below (what clients send: text and `image_url` parts, token limits,
`stream`, `stream_options`, vLLM's `chat_template_kwargs`; other fields are accepted and ignored, as vLLM does).
Responses are the `openai` package's own pydantic models.

A whole answer is a `Completion`; a streamed one is a series of `stage_protocol.backend.Delta`s
(`stage_protocol.server.events`).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat import chat_completion as completion_types
from openai.types.chat import chat_completion_chunk as chunk_types
from pydantic import BaseModel, ConfigDict, Field, field_validator

from stage_protocol.backend import Delta, FinishReason


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


@dataclass(frozen=True)
class Completion:
    """A whole answer: its text, the model's thinking (None when it did none), why it ended, and the token counts
    (None where the backend does not count them; reported as 0)."""

    text: str
    thinking: str | None = None
    finish_reason: FinishReason = "stop"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(frozen=True)
class Reply:
    """What the completion or every chunk of one response shares: its id, creation time and model name."""

    model: str
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def completion(self, answer: Completion) -> ChatCompletion:
        message = ChatCompletionMessage(role="assistant", content=answer.text, reasoning_content=answer.thinking)
        choice = completion_types.Choice(index=0, message=message, finish_reason=answer.finish_reason)
        return ChatCompletion(
            id=self.id,
            choices=[choice],
            created=self.created,
            model=self.model,
            object="chat.completion",
            usage=usage(answer.prompt_tokens, answer.completion_tokens),
        )

    def chunk(self, delta: chunk_types.ChoiceDelta, finish_reason: FinishReason | None = None) -> str:
        choice = chunk_types.Choice(index=0, delta=delta, finish_reason=finish_reason)
        return self._event(self._chunk([choice]))

    def usage_chunk(self, finish: Delta) -> str:
        """The last chunk when `stream_options.include_usage` is set: no choices, the usage of the whole answer."""
        chunk = self._chunk([])
        chunk.usage = usage(finish.prompt_tokens, finish.completion_tokens)
        return self._event(chunk)

    def _chunk(self, choices: list[chunk_types.Choice]) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, choices=choices, created=self.created, model=self.model, object="chat.completion.chunk"
        )

    @staticmethod
    def _event(chunk: ChatCompletionChunk) -> str:
        return f"data: {chunk.to_json(indent=None)}\n\n"


def usage(prompt_tokens: int | None, completion_tokens: int | None) -> CompletionUsage:
    prompt, completion = prompt_tokens or 0, completion_tokens or 0
    return CompletionUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
