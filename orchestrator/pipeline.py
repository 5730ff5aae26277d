"""One analysis: route the question, look at the image, reason when routed there, and compose the answer.

On the vision-only route the vision stage answers the question (`answer` task). On the reasoning route it describes
the image with the question in mind (`describe` task) and the reasoning stage answers from that description; when
the reasoning stage is disabled, down or broken, the vision stage is asked for its own answer, which is returned
clearly marked. A vision failure fails the request (there is nothing to answer from); a reasoning failure never does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from orchestrator.messages import REVIEW_PROFILES, Language, Profile, detect_language, disclaimer, notice
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
    failures: tuple[StageFailure, ...] = field(default=())


@dataclass(frozen=True)
class _ReasoningOutcome:
    result: ReasoningResult | None
    notices: tuple[str, ...]
    degraded: bool
    failure: StageFailure | None


class Pipeline:
    def __init__(
        self, vision: VisionBackend, reasoning: ReasoningBackend, settings: ReasoningSettings, router: Router
    ) -> None:
        self._vision = vision
        self._reasoning = reasoning
        self._settings = settings
        self._router = router

    async def run(self, request: AnalyzeInput) -> AnalyzeOutcome:
        started = time.perf_counter()
        language = detect_language(request.question)
        decision = await self._router.route(request.question, request.mode)
        timings = {"route": _ms_since(started)}

        wants_reasoning = decision.decision == "vision_then_reasoning"
        vision_started = time.perf_counter()
        vision = await self._look(request, "describe" if wants_reasoning else "answer")
        timings["vision"] = _ms_since(vision_started)

        reasoning = _ReasoningOutcome(None, (), False, None)
        answer = _vision_answer(vision)
        if wants_reasoning:
            reasoning_started = time.perf_counter()
            reasoning = await self._reason(vision, request, language)
            timings["reasoning"] = _ms_since(reasoning_started)
            if reasoning.result is not None:
                answer = reasoning.result.text
            else:
                fallback_started = time.perf_counter()
                answer = _vision_answer(await self._look(request, "answer"))
                timings["vision_answer"] = _ms_since(fallback_started)
        timings["total"] = _ms_since(started)

        answered_by_llm = reasoning.result is not None
        return AnalyzeOutcome(
            answer=answer,
            mode="vision_then_reasoning" if answered_by_llm else "vision_only",
            route=decision,
            vision=vision,
            reasoning=reasoning.result,
            language=language,
            degraded=reasoning.degraded,
            notices=reasoning.notices,
            disclaimer=disclaimer(request.profile, language),
            needs_human_review=request.profile in REVIEW_PROFILES,
            timings_ms=timings,
            failures=(reasoning.failure,) if reasoning.failure else (),
        )

    async def _look(self, request: AnalyzeInput, task: VisionTask) -> VisionResult:
        return await self._vision.generate(VisionRequest(request.image, request.question, task=task))

    async def _reason(self, vision: VisionResult, request: AnalyzeInput, language: Language) -> _ReasoningOutcome:
        messages = reasoning_messages(vision, request.question, request.profile, language)
        reasoning_request = ReasoningRequest(
            messages, max_new_tokens=self._settings.max_new_tokens, temperature=self._settings.temperature
        )
        try:
            result = await self._reasoning.generate(reasoning_request)
        except ReasoningDisabled:
            return _ReasoningOutcome(None, (notice("reasoning_disabled", language),), False, None)
        except ReasoningError as exc:
            log.warning("reasoning stage failed (backend %s): %s: %s", self._reasoning.name, type(exc).__name__, exc)
            failure = StageFailure("reasoning", self._reasoning.name, type(exc).__name__, str(exc))
            text = notice("reasoning_failed", language, detail=f"{self._reasoning.name}: {type(exc).__name__}")
            return _ReasoningOutcome(None, (text,), True, failure)
        if not result.text.strip():
            failure = StageFailure("reasoning", self._reasoning.name, "EmptyAnswer", "the model answered nothing")
            text = notice("reasoning_failed", language, detail=f"{self._reasoning.name}: empty answer")
            return _ReasoningOutcome(None, (text,), True, failure)
        notices = (notice("reasoning_truncated", language),) if result.finish_reason == "length" else ()
        return _ReasoningOutcome(result, notices, False, None)


def _vision_answer(vision: VisionResult) -> str:
    return vision.answer if vision.answer else vision.caption


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 2)
