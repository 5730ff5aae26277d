"""One analysis: route the question, look at the image, reason when routed there, and compose the answer.

On the vision-only route the vision stage answers the question (`answer` task). On the reasoning route it describes
the image with the question in mind (`describe` task) and the reasoning stage answers from that description; when
the reasoning stage is disabled, down or broken, the vision stage is asked for its own answer, which is returned
clearly marked. A vision failure fails the request (there is nothing to answer from); a reasoning failure never does.

`response_format="json"` always takes the reasoning route, whatever the requested mode (`route.reason` says so):
the fields are the reasoning stage's reading of the description, checked claim by claim like a prose answer
(`orchestrator.answer_json`). The answer is then the fields as compact JSON, with `answer_fields` the parsed object.
An answer that is not JSON is returned as written, with `answer_fields` None, a notice, and marked for review. When
the reasoning stage does not answer, the vision stage's fallback answer is prose and `answer_fields` is None.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

from orchestrator.answer_json import Fields, ResponseFormat, parse_fields, serialise
from orchestrator.arbiter import Arbiter, Context, Judged, vision_confidence
from orchestrator.arbitration import Arbitration
from orchestrator.messages import Language, Profile, detect_language, disclaimer, notice
from orchestrator.prompts import reasoning_messages
from orchestrator.routing import Decision, RequestedMode, RouteDecision, Router
from orchestrator.settings import ReasoningSettings
from reasoning_stage.backend import ReasoningBackend
from reasoning_stage.errors import ReasoningDisabled, ReasoningError
from reasoning_stage.types import ReasoningRequest, ReasoningResult
from vision_stage.backend import VisionBackend
from vision_stage.types import DecodedImage, VisionRequest, VisionResult, VisionTask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalyzeInput:
    image: DecodedImage
    question: str
    mode: RequestedMode = "auto"
    profile: Profile = "general"
    response_format: ResponseFormat = "text"


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
class _ReasoningOutcome:
    result: ReasoningResult | None
    notices: tuple[str, ...]
    degraded: bool
    failure: StageFailure | None
    request: ReasoningRequest


class Pipeline:
    """`probe_limit`: how many yes/no probes the arbiter may put to the vision stage per answer (0: none); the caller
    resolves `arbitration.probes` against the vision backend (`orchestrator.wiring.probe_limit`)."""

    def __init__(
        self,
        vision: VisionBackend,
        reasoning: ReasoningBackend,
        settings: ReasoningSettings,
        router: Router,
        *,
        probe_limit: int = 0,
    ) -> None:
        self._vision = vision
        self._reasoning = reasoning
        self._settings = settings
        self._router = router
        self._arbiter = Arbiter(reasoning, vision, probe_limit)

    async def route(self, question: str, mode: RequestedMode, response_format: ResponseFormat = "text") -> Routed:
        """Where the question goes. Separate from `run` so a caller can route while it decodes the image."""
        started = time.perf_counter()
        if response_format != "json":
            decision = await self._router.route(question, mode)
        else:
            forced = await self._router.route(question, "reasoning")
            decision = replace(forced, reason="response_format json: the reasoning stage extracts the fields")
        return Routed(decision, started, _ms_since(started))

    async def run(self, request: AnalyzeInput, routed: Routed | None = None) -> AnalyzeOutcome:
        """Answer `request`; `routed` is its route when the caller already has it (timings then count from the
        route's start)."""
        if routed is None:
            routed = await self.route(request.question, request.mode, request.response_format)
        started, decision = routed.started, routed.decision
        language = detect_language(request.question)
        timings = {"route": routed.ms}
        wants_reasoning = decision.decision == "vision_then_reasoning"
        vision_started = time.perf_counter()
        vision = await self._look(request, "describe" if wants_reasoning else "answer")
        timings["vision"] = _ms_since(vision_started)
        context = Context(
            vision, decision, self._router.threshold, request.profile, language, request.image, request.response_format
        )
        if not wants_reasoning:
            return _vision_outcome(context, _vision_answer(vision), timings, started)
        reasoning_started = time.perf_counter()
        reasoning = await self._reason(vision, request, language)
        timings["reasoning"] = _ms_since(reasoning_started)
        if reasoning.result is None:
            fallback_started = time.perf_counter()
            answer = _vision_answer(await self._look(request, "answer"))
            timings["vision_answer"] = _ms_since(fallback_started)
            return _vision_outcome(context, answer, timings, started, reasoning)
        arbitration_started = time.perf_counter()
        judged = await self._arbiter.judge(reasoning.result, reasoning.request, context)
        timings["arbitration"] = _ms_since(arbitration_started)
        timings["total"] = _ms_since(started)
        return _reasoned_outcome(context, judged, timings)

    async def _look(self, request: AnalyzeInput, task: VisionTask) -> VisionResult:
        return await self._vision.generate(VisionRequest(request.image, request.question, task=task))

    async def _reason(self, vision: VisionResult, request: AnalyzeInput, language: Language) -> _ReasoningOutcome:
        messages = reasoning_messages(vision, request.question, request.profile, language, request.response_format)
        reasoning_request = ReasoningRequest(
            messages, max_new_tokens=self._settings.max_new_tokens, temperature=self._settings.temperature
        )
        try:
            result = await self._reasoning.generate(reasoning_request)
        except ReasoningDisabled:
            return _ReasoningOutcome(None, (notice("reasoning_disabled", language),), False, None, reasoning_request)
        except ReasoningError as exc:
            log.warning("reasoning stage failed (backend %s): %s: %s", self._reasoning.name, type(exc).__name__, exc)
            failure = StageFailure("reasoning", self._reasoning.name, type(exc).__name__, str(exc))
            text = notice("reasoning_failed", language, detail=f"{self._reasoning.name}: {type(exc).__name__}")
            return _ReasoningOutcome(None, (text,), True, failure, reasoning_request)
        if not result.text.strip():
            failure = StageFailure("reasoning", self._reasoning.name, "EmptyAnswer", "the model answered nothing")
            text = notice("reasoning_failed", language, detail=f"{self._reasoning.name}: empty answer")
            return _ReasoningOutcome(None, (text,), True, failure, reasoning_request)
        return _ReasoningOutcome(result, (), False, None, reasoning_request)


def _reasoned_outcome(context: Context, judged: Judged, timings: dict[str, float]) -> AnalyzeOutcome:
    """The reasoning stage's (checked) answer; as JSON fields when they were asked for (module docstring)."""
    answer, fields, notices = judged.result.text, None, judged.notices
    review = judged.arbitration.needs_human_review
    if context.response_format == "json":
        fields = parse_fields(answer)
        if fields is None:
            notices, review = (*notices, notice("answer_not_json", context.language)), True
        else:
            answer = serialise(fields)
    return AnalyzeOutcome(
        answer=answer,
        mode="vision_then_reasoning",
        route=context.route,
        vision=context.vision,
        reasoning=judged.result,
        language=context.language,
        degraded=False,
        notices=(*notices, *_truncation(judged.result, context.language)),
        disclaimer=disclaimer(context.profile, context.language),
        needs_human_review=review,
        timings_ms=timings,
        confidence=judged.arbitration.confidence,
        arbitration=judged.arbitration,
        answer_fields=fields,
    )


def _vision_outcome(
    context: Context,
    answer: str,
    timings: dict[str, float],
    started: float,
    reasoning: _ReasoningOutcome | None = None,
) -> AnalyzeOutcome:
    """The vision stage's answer: on the vision-only route, or standing in for a reasoning stage that did not."""
    timings["total"] = _ms_since(started)
    score, review = vision_confidence(context)
    return AnalyzeOutcome(
        answer=answer,
        mode="vision_only",
        route=context.route,
        vision=context.vision,
        reasoning=None,
        language=context.language,
        degraded=reasoning.degraded if reasoning else False,
        notices=reasoning.notices if reasoning else (),
        disclaimer=disclaimer(context.profile, context.language),
        needs_human_review=review,
        timings_ms=timings,
        confidence=score,
        failures=(reasoning.failure,) if reasoning and reasoning.failure else (),
    )


def _truncation(result: ReasoningResult, language: Language) -> tuple[str, ...]:
    return (notice("reasoning_truncated", language),) if result.finish_reason == "length" else ()


def _vision_answer(vision: VisionResult) -> str:
    return vision.answer if vision.answer else vision.caption


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 2)
