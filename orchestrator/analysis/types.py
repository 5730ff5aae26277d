"""What one analysis takes and gives: its input, its outcome, and the events of an analysis streamed as it goes
(`orchestrator.analysis.pipeline` says in which order they come)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator.analysis.messages import Language, Profile
from orchestrator.analysis.routing import Decision, RequestedMode, RouteDecision
from orchestrator.arbitration.answer_json import Fields, ResponseFormat
from orchestrator.arbitration.decision import Arbitration
from reasoning_stage.errors import ReasoningError
from reasoning_stage.types import ChatMessage, ReasoningResult, Sampling
from vision_stage.types import DecodedImage, VisionResult


@dataclass(frozen=True, kw_only=True)
class Options:
    """What a request asks of an analysis besides its image and question."""

    mode: RequestedMode = "auto"
    profile: Profile = "general"
    response_format: ResponseFormat = "text"
    history: tuple[ChatMessage, ...] = ()
    """Earlier turns of a conversation, given to the reasoning stage between its instructions and the question."""
    max_new_tokens: int | None = None
    """The reasoning stage's answer budget; None: the configured `reasoning.max_new_tokens`."""
    temperature: float | None = None
    """The reasoning stage's sampling temperature (0: greedy); None: the configured `reasoning.temperature`."""
    sampling: Sampling = field(default_factory=Sampling)
    """Optional sampling fields for the reasoning stage (`top_p`, `seed`, `stop`, …); unset: its server's defaults."""

    def given(self) -> dict[str, Any]:
        """The options as keyword arguments (of `Options` or `AnalyzeInput`)."""
        return {name: getattr(self, name) for name in Options.__dataclass_fields__}


@dataclass(frozen=True, kw_only=True)
class AnalyzeInput(Options):
    image: DecodedImage = field(kw_only=False)
    question: str = field(kw_only=False)
    image_url: str | None = None
    """The http(s) URL the image was fetched from, for a vision backend that passes URLs through
    (`vision.pass_image_urls`); None for uploads, base64 and `data:` URLs."""
    description: VisionResult | None = None
    """A `describe` result of this image from an earlier question (`orchestrator.analysis.sessions`): the reasoning
    route reuses it instead of asking the vision stage again."""


@dataclass(frozen=True)
class StageFailure:
    """A stage that failed without failing the request: which stage, which backend, which error."""

    stage: str
    backend: str
    error_type: str
    message: str


@dataclass(frozen=True)
class StageUsage:
    """One stage's model generations for a request: how many, and the tokens they read and wrote (0 where the
    backend does not count tokens, as `ocr` does not)."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Spend:
    """Every model generation a request caused, as it happens: the vision stage's (its description or answer, the
    answer standing in for a failed reasoning stage, the arbiter's probes; not those served from the cache) and the
    reasoning stage's (the first answer, unusable ones included, and a re-asked one). The pipeline and the arbiter
    add to it; `usage` sums it up."""

    vision: list[tuple[int, int]] = field(default_factory=list)
    reasoning: list[tuple[int, int]] = field(default_factory=list)

    def looked(self, result: VisionResult) -> None:
        if not result.cached:
            self.vision.append((result.prompt_tokens, result.completion_tokens))

    def reasoned(self, result: ReasoningResult) -> None:
        self.reasoning.append((result.prompt_tokens, result.completion_tokens))

    def usage(self) -> tuple[StageUsage, StageUsage]:
        """(vision, reasoning)."""
        return _summed(self.vision), _summed(self.reasoning)


def _summed(calls: list[tuple[int, int]]) -> StageUsage:
    return StageUsage(len(calls), sum(p for p, _ in calls), sum(c for _, c in calls))


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
    usage: tuple[StageUsage, StageUsage] = (StageUsage(), StageUsage())
    """(vision, reasoning): every generation the request caused (`Spend`)."""


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
