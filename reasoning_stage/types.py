"""What goes into and comes out of the reasoning stage."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from reasoning_stage.errors import ReasoningInvalidOutput
from stage_protocol.backend import Delta, FinishReason
from stage_protocol.model_text import split_thinking

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class ChatMessage:
    """One message of the conversation the reasoning stage continues."""

    role: Role
    content: str


@dataclass(frozen=True)
class Sampling:
    """Optional sampling fields a client asked for, by their OpenAI names; None (or no `stop`): the server's default.

    The `remote` backend sends those its server's dialect takes (`stage_protocol.client.dialects`); the `local` backend
    ignores them."""

    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def fields(self) -> dict[str, object]:
        """The fields set, by name (`stop` as a list), in this order."""
        values: dict[str, object] = {
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": list(self.stop) or None,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }
        return {name: value for name, value in values.items() if value is not None}


@dataclass(frozen=True)
class ReasoningRequest:
    """A chat to continue. `temperature == 0` means greedy decoding."""

    messages: tuple[ChatMessage, ...]
    max_new_tokens: int = 256
    temperature: float = 0.0
    sampling: Sampling = field(default_factory=Sampling)


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


ReasoningDelta = Delta
"""One piece of a streamed answer: text, or thinking, or (last) the finish reason and token counts."""


@dataclass
class Collected:
    """A streamed answer as it arrives (`add` each delta), and whole (`result`): the same `ReasoningResult` that
    `generate` returns, thinking split off the text even where the stream could not tell (a lone `</think>`,
    `<answer>` tags)."""

    text: list[str] = field(default_factory=list)
    thinking: list[str] = field(default_factory=list)
    last: ReasoningDelta = field(default_factory=ReasoningDelta)
    started: float = field(default_factory=time.perf_counter)

    def add(self, delta: ReasoningDelta) -> None:
        self.text.append(delta.text)
        self.thinking.append(delta.thinking)
        self.last = delta

    @property
    def anything(self) -> bool:
        return any(self.text) or any(self.thinking)

    def result(self, backend: str, model: str, *, where: str) -> ReasoningResult:
        """The answer so far, whole; `ReasoningInvalidOutput` naming `where` when the stream gave no finish reason.
        Token counts are 0 when the server sent no usage."""
        finish = self.last.finish_reason
        if finish is None:
            raise ReasoningInvalidOutput(f"{where} ended without a finish reason")
        late_thinking, text = split_thinking("".join(self.text))
        thinking = [part for part in ("".join(self.thinking).strip(), late_thinking) if part]
        return ReasoningResult(
            backend=backend,
            model=model,
            text=text,
            prompt_tokens=self.last.prompt_tokens or 0,
            completion_tokens=self.last.completion_tokens or 0,
            finish_reason=finish,
            latency_ms=(time.perf_counter() - self.started) * 1000,
            thinking="\n".join(thinking) or None,
        )
