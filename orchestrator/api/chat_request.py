"""`POST /v1/chat/completions`'s request and `GET /v1/models` in OpenAI's wire format, so the official `openai`
client works.

The `model` names the route: `auto` (the router decides), `vision-only`, `vision-then-reasoning`. The question is the
last message's text, which must be the user's; the image is the most recent `image_url` part in the conversation
(a `data:image/...;base64,...` URL, or an http(s) URL, fetched as `/v1/analyze` fetches one), and a message with more
than one is refused (`too_many_images`: the vision stage looks at one image); the earlier messages' text goes to the
reasoning stage as history, a `developer` message as a `system` one. The request model refuses unknown fields; the
sampling fields OpenAI clients send (`top_p`, `seed`, `stop`, `presence_penalty`, `frequency_penalty`) go to the
reasoning stage where its backend takes them, and the others are named in `orchestration.not_applied`; `logprobs`
may only be false (`unsupported_parameter`).

The answer is rendered by `orchestrator.api.chat_reply`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StringConstraints
from starlette.exceptions import HTTPException

from orchestrator.analysis.messages import Profile
from orchestrator.analysis.routing import RequestedMode
from orchestrator.api.intake import checked_text
from orchestrator.api.schemas import EXAMPLE_IMAGE_URL
from orchestrator.arbitration.answer_json import ResponseFormat
from orchestrator.errors import ImageMissing, ParameterNotSupported, TooManyImages, ValidationFailed
from orchestrator.stage_settings import ReasoningSettings
from reasoning_stage.types import ChatMessage, Sampling
from stage_protocol.client import dialect
from stage_protocol.server.openai import ContentPart, MessageIn, StreamOptions

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


class ModelOut(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    description: str


class ModelListOut(BaseModel):
    object: Literal["list"]
    data: list[ModelOut]


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
