"""`POST /v1/chat/completions` and `GET /v1/models` in OpenAI's wire format, so the official `openai` client works.

The `model` names the route: `auto` (the router decides), `vision-only`, `vision-then-reasoning`. The question is the
last message's text, which must be the user's; the image is the most recent `image_url` part in the conversation
(a `data:image/...;base64,...` URL, or an http(s) URL, fetched as `/v1/analyze` fetches one), and a message with more
than one is refused (`too_many_images`: the vision stage looks at one image); the earlier messages' text goes to the
reasoning stage as history, a `developer` message as a `system` one. The request model refuses unknown fields; the
sampling fields OpenAI clients send (`top_p`, `seed`, `stop`, `presence_penalty`, `frequency_penalty`) go to the
reasoning stage where its backend takes them, and the others are named in `orchestration.not_applied`; `logprobs`
may only be false (`unsupported_parameter`).

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
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StringConstraints
from starlette.exceptions import HTTPException

from orchestrator.analysis.messages import Profile
from orchestrator.analysis.routing import Decision, RequestedMode
from orchestrator.analysis.types import AnalyzeOutcome, DeltaEvent, DoneEvent, ErrorEvent, PipelineEvent
from orchestrator.api.events import error_body, sse, stage_error_body
from orchestrator.api.intake import checked_text
from orchestrator.api.schemas import (
    EXAMPLE_IMAGE_URL,
    ArbitrationOut,
    ErrorResponse,
    FailureOut,
    RouteOut,
    UsageOut,
    analyze_response,
    usage_out,
)
from orchestrator.arbitration.answer_json import ResponseFormat
from orchestrator.errors import ImageMissing, ParameterNotSupported, TooManyImages, ValidationFailed
from orchestrator.settings import ReasoningSettings
from reasoning_stage.types import ChatMessage, FinishReason, Sampling
from stage_protocol.client import dialect
from stage_protocol.server.openai import ContentPart, MessageIn, StreamOptions

SSE_DONE = "data: [DONE]\n\n"
MAX_TOKENS = 8192
"""The most `max_tokens` a request may ask of the reasoning stage (as `ORCH_REASONING__MAX_NEW_TOKENS` allows)."""
MAX_STOP_WORDS = 4
"""As OpenAI allows."""
INT64 = 2**63
StopWord = Annotated[str, StringConstraints(min_length=1)]
StopWords = Annotated[list[StopWord], Field(min_length=1, max_length=MAX_STOP_WORDS)]

MODELS: dict[str, tuple[RequestedMode, str]] = {
    "auto": ("auto", "The router decides per question whether the reasoning stage answers after the vision stage."),
    "vision-only": ("vision", "The vision stage answers alone."),
    "vision-then-reasoning": ("reasoning", "The vision stage describes the image; the reasoning stage answers."),
}
"""The model names: each a route (the `/v1/analyze` `mode` it forces) and its description."""


_SAMPLING = (
    "Sent to the reasoning stage where its backend takes it (a `remote` one, by its dialect); otherwise accepted and "
    "named in `orchestration.not_applied`."
)


class ChatResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object"] = Field(
        description="`json_object`: the answer as a JSON object of fields read from the image, each checked against "
        "it (`/v1/analyze`'s `response_format: json`); always takes the reasoning route."
    )


_EXAMPLE_CONTENT: list[JsonValue] = [
    {"type": "image_url", "image_url": {"url": EXAMPLE_IMAGE_URL}},
    {"type": "text", "text": "What is the total?"},
]


class ChatMessageIn(BaseModel):
    """A message as OpenAI clients send it; `developer` (OpenAI's name for `system` since its o1 models) is read as
    `system`."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def read(self) -> MessageIn:
        return MessageIn(role="system" if self.role == "developer" else self.role, content=self.content)


class ChatCompletionRequest(BaseModel):
    """The OpenAI request fields this service reads; any other field is refused (422)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"model": "auto", "messages": [{"role": "user", "content": _EXAMPLE_CONTENT}]},
                {
                    "model": "vision-then-reasoning",
                    "messages": [{"role": "user", "content": _EXAMPLE_CONTENT}],
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
            ]
        },
    )

    model: str = Field(description="The route: `auto`, `vision-only` or `vision-then-reasoning` (`GET /v1/models`).")
    messages: list[ChatMessageIn] = Field(
        min_length=1,
        description="The conversation; the last message is the user's question. The most recent `image_url` part "
        "(a `data:image/...;base64,...` URL, or an http(s) URL where this deployment fetches them) is the image; a "
        "message may hold one. A `developer` message is read as a `system` one.",
    )
    stream: bool = Field(default=False, description="Answer as `chat.completion.chunk` server-sent events.")
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(
        default=None, ge=0, le=2, description="The reasoning stage's sampling temperature; unset: the configured one."
    )
    max_tokens: int | None = Field(
        default=None, ge=1, le=MAX_TOKENS, description="The reasoning stage's answer budget; unset: the configured one."
    )
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS, description="As `max_tokens`.")
    top_p: float | None = Field(default=None, ge=0, le=1, description=_SAMPLING)
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64, description=_SAMPLING)
    stop: StopWord | StopWords | None = Field(
        default=None, description=f"Up to {MAX_STOP_WORDS} stop sequences. {_SAMPLING}"
    )
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, description=_SAMPLING)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, description=_SAMPLING)
    logprobs: bool | None = Field(default=None, description="Only false: this service returns no log probabilities.")
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="Refused: no log probabilities.")
    n: int = Field(default=1, ge=1, le=1, description="Only 1: one answer per request.")
    response_format: ChatResponseFormat | None = None
    profile: Profile = Field(
        default="general",
        description="An extension (the `openai` client's `extra_body`): `/v1/analyze`'s `profile`: disclaimers, "
        "review bars and the reasoning stage's context for `medical`, `legal`, `finance`.",
    )
    user: str | None = Field(default=None, description="Accepted and ignored.")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def sampling(self) -> Sampling:
        """The sampling fields; `top_p: 0` (only the likeliest token: greedy) is not sent as such, since vLLM and
        SGLang refuse 0, but as greedy decoding (`reasoning_temperature` 0)."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        top_p = self.top_p if self.top_p else None
        return Sampling(top_p, self.seed, tuple(stop), self.presence_penalty, self.frequency_penalty)

    @property
    def reasoning_temperature(self) -> float | None:
        """`temperature`, or 0 (greedy) when `top_p: 0` asks for the likeliest token only."""
        return 0.0 if self.top_p == 0 else self.temperature

    def refuse_unsupported(self) -> None:
        """Log probabilities cannot be given: the answer is composed from two stages and may be replaced."""
        if self.logprobs or self.top_logprobs is not None:
            raise ParameterNotSupported(
                "logprobs and top_logprobs are not supported: the answer is composed from the vision and reasoning "
                "stages and may be replaced after checking, so there are no token log probabilities to return; "
                "leave them out or send logprobs: false"
            )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def answer_format(self) -> ResponseFormat:
        json_object = self.response_format is not None and self.response_format.type == "json_object"
        return "json" if json_object else "text"


class VisionSummaryOut(BaseModel):
    backend: str
    model: str
    caption: str
    answer: str | None = Field(description="The vision stage's own answer, when it was asked for one.")
    latency_ms: float


class OrchestrationOut(BaseModel):
    """How the answer was reached, in the `/v1/analyze` response's terms."""

    request_id: str
    answer: str = Field(description="The answer; when streamed, the one that stands (see `replaced`).")
    answer_fields: dict[str, Any] | None
    replaced: bool = Field(
        description="Streamed only: true when a re-asked answer replaced the streamed content (which then goes on "
        "with the notices and the corrected answer)."
    )
    mode: Decision = Field(description="What actually ran.")
    route: RouteOut
    vision: VisionSummaryOut
    arbitration: ArbitrationOut
    confidence: float
    degraded: bool
    notices: list[str]
    disclaimer: str | None
    needs_human_review: bool
    language: Literal["zh", "en"]
    failures: list[FailureOut]
    timings_ms: dict[str, float]
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


class ModelOut(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    description: str


class ModelListOut(BaseModel):
    object: Literal["list"]
    data: list[ModelOut]


STREAM_EVENTS: dict[str, type[BaseModel]] = {"chunk": ChatCompletionChunkOut, "error": ErrorResponse}
"""What the `data:` lines of a streamed answer hold, for the OpenAPI description."""


def model_list(created: int) -> ModelListOut:
    models = [ModelOut(id=name, object="model", created=created, owned_by="orchestrator", description=text)
              for name, (_, text) in MODELS.items()]  # fmt: skip
    return ModelListOut(object="list", data=models)


def model_out(model: str, created: int) -> ModelOut:
    """One model (`GET /v1/models/{model}`); 404 for a name that is none of `MODELS`."""
    requested_mode(model)
    return ModelOut(id=model, object="model", created=created, owned_by="orchestrator", description=MODELS[model][1])


def requested_mode(model: str) -> RequestedMode:
    """The route a model name forces; 404 for a name that is none of `MODELS`, as OpenAI answers."""
    if model not in MODELS:
        names = ", ".join(MODELS)
        raise HTTPException(404, f"the model {model!r} does not exist; the models are {names} (GET /v1/models)")
    return MODELS[model][0]


def not_applied(sampling: Sampling, settings: ReasoningSettings) -> tuple[str, ...]:
    """The sampling fields asked for that the configured reasoning backend does not pass on: a `remote` one sends
    what its dialect takes (`stage_protocol.client.dialects`), the others none."""
    asked = sampling.fields()
    sent = dialect(settings.dialect).sampled(asked) if settings.backend == "remote" else {}
    return tuple(name for name in asked if name not in sent)


@dataclass(frozen=True)
class Conversation:
    question: str
    image_url: str
    """The most recent image in the conversation."""
    history: tuple[ChatMessage, ...]
    """The earlier messages' text, in order (messages without text are left out)."""


def read_conversation(messages: Sequence[MessageIn]) -> Conversation:
    """The question, the image and the history; a message holding more than one image is refused."""
    last = len(messages) - 1
    if messages[last].role != "user":
        raise ValidationFailed(f"messages.{last}.role: the last message must be the user's question")
    for index, message in enumerate(messages):
        if (count := len(message.image_urls())) > 1:
            raise TooManyImages(
                f"messages.{index} holds {count} images; the vision backend takes one image per request: send one "
                "image_url part (in a conversation, the most recent image is the one looked at)"
            )
    images = [url for message in messages for url in message.image_urls()]
    if not images:
        raise ImageMissing("no image in the conversation: send an image_url part (a data: or http(s) URL)")
    texts = [checked_text(message.text(), f"messages.{index}.content") for index, message in enumerate(messages)]
    history = tuple(
        ChatMessage(m.role, text.strip()) for m, text in zip(messages[:last], texts, strict=False) if text.strip()
    )
    return Conversation(texts[last], images[-1], history)


def orchestration_out(
    outcome: AnalyzeOutcome, request_id: str, replaced: bool = False, unapplied: Sequence[str] = ()
) -> OrchestrationOut:
    full = analyze_response(outcome, request_id)
    vision = outcome.vision
    summary = VisionSummaryOut(
        backend=vision.backend, model=vision.model, caption=vision.caption, answer=vision.answer,
        latency_ms=vision.latency_ms,
    )  # fmt: skip
    shared = full.model_dump(exclude={"vision", "reasoning", "usage"})
    return OrchestrationOut(**shared, vision=summary, replaced=replaced, not_applied=list(unapplied))


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
        message = ChatMessageOut(role="assistant", content=outcome.answer, reasoning_content=thinking)
        return ChatCompletionOut(
            id=self.id,
            object="chat.completion",
            created=self.created,
            model=self.model,
            choices=[ChatChoiceOut(index=0, message=message, finish_reason=finish_reason(outcome))],
            usage=usage_out(outcome),
            orchestration=orchestration_out(outcome, self.request_id, unapplied=self.not_applied),
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
        orchestration = orchestration_out(outcome, self.request_id, done.replaced, self.not_applied)
        chunks.append(self.chunk(ChunkDeltaOut(), finish_reason(outcome), orchestration=orchestration))
        if include_usage:
            chunks.append(self._event([], usage=usage_out(outcome)))
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
