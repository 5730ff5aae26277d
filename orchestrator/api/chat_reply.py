"""`POST /v1/chat/completions`'s answer in OpenAI's wire format (the request is read by
`orchestrator.api.chat_request`).

The answer is a `chat.completion` (or, with `stream: true`, `chat.completion.chunk` server-sent events ending in
`data: [DONE]`) with one extra top-level field, `orchestration`: how the answer was reached (route, vision summary,
arbitration, degradation, notices, timings), in the `/v1/analyze` response's terms. Streamed: a role chunk, the
content as the reasoning stage produces it (the LLM's thinking as `reasoning_content`), or the whole answer at once
when nothing was streamed (the vision-only route, a fallback); then a chunk with `finish_reason` and
`orchestration`, the usage chunk when `stream_options.include_usage`, and `[DONE]`. When a re-asked answer replaces
the streamed one, the content goes on with the notices and the corrected answer, and `orchestration.replaced` is
true. A failure after the first chunk is an in-band `data: {"error": {...}}` event, then `[DONE]`: the `openai`
client raises it as an `APIError`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field

from orchestrator.analysis.types import AnalyzeOutcome, DeltaEvent, DoneEvent, ErrorEvent, PipelineEvent
from orchestrator.api.events import error_body, sse, stage_error_body
from orchestrator.api.render import outcome_fields, usage_fields
from orchestrator.api.schemas import ErrorResponse, OutcomeOut, UsageOut
from stage_protocol.backend import FinishReason

SSE_DONE = "data: [DONE]\n\n"


class VisionSummaryOut(BaseModel):
    backend: str
    model: str
    caption: str
    answer: str | None = Field(description="The vision stage's own answer, when it was asked for one.")
    latency_ms: float


class OrchestrationOut(OutcomeOut):
    """How the answer was reached, in the `/v1/analyze` response's terms."""

    answer: str = Field(description="The answer; when streamed, the one that stands (see `replaced`).")
    replaced: bool = Field(
        description="Streamed only: true when a re-asked answer replaced the streamed content (which then goes on "
        "with the notices and the corrected answer)."
    )
    vision: VisionSummaryOut
    not_applied: list[str] = Field(
        description="The request's sampling fields (`top_p`, `seed`, `stop`, `presence_penalty`, "
        "`frequency_penalty`) that were accepted but not passed to the reasoning stage: its backend does not take "
        "them (the in-process `local` one takes none; a `remote` one what its server's dialect takes)."
    )


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str
    reasoning_content: str | None = Field(default=None, description="The reasoning stage's thinking, when it gave one.")


class ChatChoiceOut(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: FinishReason


class ChatCompletionOut(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoiceOut]
    usage: UsageOut = Field(description="The reasoning stage's tokens (0 when it did not answer).")
    orchestration: OrchestrationOut


class ChunkDeltaOut(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None


class ChunkChoiceOut(BaseModel):
    index: int
    delta: ChunkDeltaOut
    finish_reason: FinishReason | None


class ChatCompletionChunkOut(BaseModel):
    """One `data:` event of a streamed answer. Unset fields are left out."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoiceOut] = Field(description="Empty in the usage chunk.")
    usage: UsageOut | None = Field(default=None, description="Only in the usage chunk.")
    orchestration: OrchestrationOut | None = Field(default=None, description="Only in the chunk with `finish_reason`.")


STREAM_EVENTS: dict[str, type[BaseModel]] = {"chunk": ChatCompletionChunkOut, "error": ErrorResponse}
"""What the `data:` lines of a streamed answer hold, for the OpenAPI description."""


def orchestration_fields(
    outcome: AnalyzeOutcome, request_id: str, replaced: bool = False, unapplied: Sequence[str] = ()
) -> dict[str, Any]:
    """`OrchestrationOut`'s fields."""
    vision = outcome.vision
    summary = {
        "backend": vision.backend, "model": vision.model, "caption": vision.caption, "answer": vision.answer,
        "latency_ms": vision.latency_ms,
    }  # fmt: skip
    shared = outcome_fields(outcome, request_id)
    return {**shared, "vision": summary, "replaced": replaced, "not_applied": list(unapplied)}


def finish_reason(outcome: AnalyzeOutcome) -> FinishReason:
    return outcome.reasoning.finish_reason if outcome.reasoning else "stop"


@dataclass(frozen=True)
class ChatReply:
    """What the completion or every chunk of one answer shares: its id, creation time, model name and request id."""

    model: str
    request_id: str
    not_applied: tuple[str, ...] = ()
    """The request's sampling fields the reasoning stage did not get (`not_applied`)."""
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def completion(self, outcome: AnalyzeOutcome) -> ChatCompletionOut:
        thinking = outcome.reasoning.thinking if outcome.reasoning else None
        message = {"role": "assistant", "content": outcome.answer, "reasoning_content": thinking}
        return ChatCompletionOut.model_validate(
            {
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(outcome)}],
                "usage": usage_fields(outcome),
                "orchestration": orchestration_fields(outcome, self.request_id, unapplied=self.not_applied),
            }
        )

    def chunk(self, delta: ChunkDeltaOut, finish: FinishReason | None = None, **extra: Any) -> str:
        return self._event([ChunkChoiceOut(index=0, delta=delta, finish_reason=finish)], **extra)

    def ending(self, done: DoneEvent, content_sent: bool, include_usage: bool) -> list[str]:
        """The chunks after the streamed content: what of the answer is still to send, the finish reason with the
        orchestration, and the usage when asked for."""
        outcome, chunks = done.outcome, []
        if not content_sent:
            chunks.append(self.chunk(ChunkDeltaOut(content=outcome.answer)))
        elif done.replaced:
            chunks.append(self.chunk(ChunkDeltaOut(content=replacement(outcome))))
        orchestration = orchestration_fields(outcome, self.request_id, done.replaced, self.not_applied)
        chunks.append(self.chunk(ChunkDeltaOut(), finish_reason(outcome), orchestration=orchestration))
        if include_usage:
            chunks.append(self._event([], usage=usage_fields(outcome)))
        return chunks

    def _event(self, choices: list[ChunkChoiceOut], **extra: Any) -> str:
        chunk = ChatCompletionChunkOut(
            id=self.id, object="chat.completion.chunk", created=self.created, model=self.model, choices=choices, **extra
        )
        return sse(chunk, exclude_unset=True)


def replacement(outcome: AnalyzeOutcome) -> str:
    """What follows streamed content that a re-asked answer replaced: the notices saying so, then the answer."""
    return "\n\n" + "\n".join(outcome.notices) + "\n\n" + outcome.answer


async def chat_events(
    events: AsyncGenerator[PipelineEvent, None], reply: ChatReply, *, include_usage: bool
) -> AsyncGenerator[str, None]:
    """The chunks of a streamed answer (module docstring), `[DONE]` last whatever happens."""
    yield reply.chunk(ChunkDeltaOut(role="assistant", content=""))
    content_sent = False
    try:
        async with aclosing(events):
            async for event in events:
                if isinstance(event, DeltaEvent):
                    content_sent = content_sent or bool(event.text)
                    yield reply.chunk(_delta(event))
                elif isinstance(event, ErrorEvent):
                    yield sse(ErrorResponse(error=stage_error_body(event, reply.request_id)))
                    break
                elif isinstance(event, DoneEvent):
                    for chunk in reply.ending(event, content_sent, include_usage):
                        yield chunk
    except Exception as exc:
        yield sse(ErrorResponse(error=error_body(exc, reply.request_id)))
    yield SSE_DONE


def _delta(event: DeltaEvent) -> ChunkDeltaOut:
    """Only the fields the event fills, so that unset ones are left out of the chunk."""
    fields = {"content": event.text, "reasoning_content": event.thinking}
    return ChunkDeltaOut(**{name: value for name, value in fields.items() if value})
