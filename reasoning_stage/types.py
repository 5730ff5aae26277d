"""What goes into and comes out of the reasoning stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True)
class ReasoningRequest:
    """A chat to continue. `temperature == 0` means greedy decoding."""

    messages: tuple[ChatMessage, ...]
    max_new_tokens: int = 256
    temperature: float = 0.0


@dataclass(frozen=True)
class ReasoningResult:
    """The answer. `thinking` is the model's reasoning trace (vLLM/SGLang `reasoning_content`, or a `<think>` block)
    when the model produced one; it is never part of `text`."""

    backend: str
    model: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    latency_ms: float = 0.0
    thinking: str | None = None


@dataclass(frozen=True)
class ReasoningDelta:
    """One piece of a streamed answer: text, or thinking, or (last) the finish reason and token counts."""

    text: str = ""
    thinking: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
