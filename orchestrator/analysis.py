"""What one analysis takes and gives: its input, its outcome, and the events of an analysis streamed as it goes
(`orchestrator.pipeline` says in which order they come)."""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.answer_json import Fields, ResponseFormat
from orchestrator.arbitration import Arbitration
from orchestrator.messages import Language, Profile
from orchestrator.routing import Decision, RequestedMode, RouteDecision
from reasoning_stage.errors import ReasoningError
from reasoning_stage.types import ChatMessage, ReasoningResult
from vision_stage.types import DecodedImage, VisionResult


@dataclass(frozen=True)
class AnalyzeInput:
    image: DecodedImage
    question: str
    mode: RequestedMode = "auto"
    profile: Profile = "general"
    response_format: ResponseFormat = "text"
    history: tuple[ChatMessage, ...] = ()
    """Earlier turns of a conversation, given to the reasoning stage between its instructions and the question."""
    max_new_tokens: int | None = None
    """The reasoning stage's answer budget; None: the configured `reasoning.max_new_tokens`."""
    temperature: float | None = None
    """The reasoning stage's sampling temperature (0: greedy); None: the configured `reasoning.temperature`."""
    image_url: str | None = None
    """The http(s) URL the image was fetched from, for a vision backend that passes URLs through
    (`vision.pass_image_urls`); None for uploads, base64 and `data:` URLs."""
    description: VisionResult | None = None
    """A `describe` result of this image from an earlier question (`orchestrator.sessions`): the reasoning route
    reuses it instead of asking the vision stage again."""


@dataclass(frozen=True)
class StageFailure:
    """A stage that failed without failing the request: which stage, which backend, which error."""

    stage: str
    backend: str
    error_type: str
    message: str


@dataclass(frozen=True)
class AnalyzeOutcome:
    answer: str
    mode: Decision
    route: RouteDecision
    vision: VisionResult
    reasoning: ReasoningResult | None
    language: Language
    degraded: bool
    notices: tuple[str, ...]
    disclaimer: str | None
    needs_human_review: bool
    timings_ms: dict[str, float]
    confidence: float
    arbitration: Arbitration | None = None
    """None when no reasoning answer was checked (vision-only route, or the reasoning stage did not answer)."""
    failures: tuple[StageFailure, ...] = field(default=())
    answer_fields: Fields | None = None
    """The answer's fields when `json` was asked for and the answer parsed; None otherwise."""


@dataclass(frozen=True)
class Routed:
    """A route decision, when routing started (`time.perf_counter()`) and how long it took."""

    decision: RouteDecision
    started: float
    ms: float


@dataclass(frozen=True)
class RouteEvent:
    """Where the question goes; always the first event."""

    route: RouteDecision


@dataclass(frozen=True)
class VisionEvent:
    """What the vision stage saw: its description on the reasoning route, its answer on the vision-only route."""

    vision: VisionResult


@dataclass(frozen=True)
class DeltaEvent:
    """A piece of the reasoning stage's answer (`text`) or of its thinking, as the LLM produces it."""

    text: str = ""
    thinking: str = ""


@dataclass(frozen=True)
class ErrorEvent:
    """The reasoning stage failed after deltas were yielded; the `DoneEvent` with the fallback answer follows."""

    failure: StageFailure
    error: ReasoningError


@dataclass(frozen=True)
class ArbitrationEvent:
    """The reasoning answer checked against the image. `answer` is the answer returned; `replaced`: it is not the
    streamed text (a re-asked answer was returned)."""

    arbitration: Arbitration
    answer: str
    replaced: bool


@dataclass(frozen=True)
class DoneEvent:
    """The whole outcome; always the last event. `replaced`: text deltas were yielded and `outcome.answer` is not
    their text (a re-asked answer, or the vision stage's answer after the reasoning stage failed mid-answer)."""

    outcome: AnalyzeOutcome
    replaced: bool = False


PipelineEvent = RouteEvent | VisionEvent | DeltaEvent | ErrorEvent | ArbitrationEvent | DoneEvent
