"""One analysis: route the question, look at the image, reason when routed there, and compose the answer.

On the vision-only route the vision stage answers the question (`answer` task). On the reasoning route it describes
the image with the question in mind (`describe` task) and the reasoning stage answers from that description; when
the reasoning stage is disabled, down or broken, the vision stage is asked for its own answer, which is returned
clearly marked. A vision failure fails the request (there is nothing to answer from); a reasoning failure never does.
An answer the vision stage's fallback backend gave (`VisionResult.fallback`) is marked degraded, with its notice.

`response_format="json"` always takes the reasoning route, whatever the requested mode (`route.reason` says so):
the fields are the reasoning stage's reading of the description, checked claim by claim like a prose answer
(`orchestrator.arbitration.answer_json`). The answer is then the fields as compact JSON, with `answer_fields` the parsed
object. An answer that is not JSON is returned as written, with `answer_fields` None, a notice, and marked for review.
When the reasoning stage does not answer, the vision stage's fallback answer is prose and `answer_fields` is None.

Streaming: `Pipeline.stream` yields the analysis as events, in this order: `RouteEvent`, `VisionEvent`, on the
reasoning route the `DeltaEvent`s of the reasoning stage's answer as the LLM produces them (from a
`StreamingReasoningBackend`; a backend that only generates yields none) and an `ArbitrationEvent`, and last a
`DoneEvent` with the whole `AnalyzeOutcome`. `run` is the same sequence with the reasoning stage answering whole,
collected into its outcome. A reasoning failure before the first delta falls back to the vision stage's answer as
`run` does; a failure after deltas were yielded yields an `ErrorEvent` naming it, then the fallback's `DoneEvent`
with `replaced` set: the streamed text is incomplete, and the outcome's answer replaces it. The arbiter checks the
complete answer after the stream; when a re-asked answer is returned, `replaced` is set too. Closing the stream
early closes the reasoning backend's stream, which stops the generation.

The second witness (`orchestrator.arbitration.witness`), when there is one: on the reasoning route its reading of
the image starts as soon as the route is known, runs beside the vision and reasoning stages, and is awaited only by
the arbiter; the vision-only route never starts it, and it is cancelled whenever the analysis ends. A witness that
fails or is late only leaves arbitration without it.

`caption` asks the vision stage alone for its one-sentence caption (`POST /caption`): no routing, no reasoning.
The answers here are unfiltered; the API filters them where they leave (`orchestrator.security.output_filter`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, replace

from orchestrator.analysis.degeneration import WHAT, degeneration
from orchestrator.analysis.messages import Language, detect_language, disclaimer, notice
from orchestrator.analysis.prompts import reasoning_messages
from orchestrator.analysis.routing import RequestedMode, Router
from orchestrator.analysis.types import (
    AnalyzeInput,
    AnalyzeOutcome,
    ArbitrationEvent,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    PipelineEvent,
    Routed,
    RouteEvent,
    Spend,
    StageFailure,
    VisionEvent,
)
from orchestrator.arbitration.answer_json import ResponseFormat, parse_fields, serialise
from orchestrator.arbitration.driver import Arbiter, Context, Judged, vision_confidence
from orchestrator.arbitration.witness import Witness, WitnessReading
from orchestrator.stage_settings import ReasoningSettings
from reasoning_stage.backend import ReasoningBackend, StreamingReasoningBackend
from reasoning_stage.errors import ReasoningDisabled, ReasoningError, ReasoningInvalidOutput
from reasoning_stage.types import Collected, ReasoningRequest, ReasoningResult
from vision_stage.backend import VisionBackend
from vision_stage.types import DecodedImage, VisionRequest, VisionResult, VisionTask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _ReasoningOutcome:
    result: ReasoningResult | None
    notices: tuple[str, ...]
    degraded: bool
    failure: StageFailure | None
    request: ReasoningRequest
    streamed: bool = False
    """Text deltas of this answer were yielded."""


class Pipeline:
    """`probe_limit`: how many yes/no probes the arbiter may put to the vision stage per answer (0: none); the caller
    resolves `arbitration.probes` against the vision backend (`orchestrator.wiring.probe_limit`). `witness`: the
    second reader of the image's text (`orchestrator.arbitration.witness`), or None; arbitration waits for its
    reading at most `witness_timeout_s`."""

    def __init__(
        self,
        vision: VisionBackend,
        reasoning: ReasoningBackend,
        settings: ReasoningSettings,
        router: Router,
        *,
        probe_limit: int = 0,
        witness: Witness | None = None,
        witness_timeout_s: float = 2.0,
    ) -> None:
        self._vision = vision
        self._reasoning = reasoning
        self._settings = settings
        self._router = router
        self._arbiter = Arbiter(reasoning, vision, probe_limit)
        self._witness = witness
        self._witness_timeout_s = witness_timeout_s

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
        async with aclosing(self._steps(request, routed, streaming=False)) as events:
            async for event in events:
                if isinstance(event, DoneEvent):
                    return event.outcome
        raise AssertionError("the pipeline ended without a DoneEvent")  # unreachable: `_steps` always ends with one

    async def caption(self, image: DecodedImage) -> VisionResult:
        """The vision stage's one-sentence caption of `image` (its `caption` task). A vision failure raises, as it
        fails an analysis."""
        return await self._vision.generate(VisionRequest(image, task="caption"))

    def stream(self, request: AnalyzeInput, routed: Routed | None = None) -> AsyncGenerator[PipelineEvent, None]:
        """`run` as events, the reasoning stage's answer streamed (module docstring). Close the generator (or use
        `contextlib.aclosing`) when leaving it early."""
        return self._steps(request, routed, streaming=True)

    async def _steps(
        self, request: AnalyzeInput, routed: Routed | None, *, streaming: bool
    ) -> AsyncGenerator[PipelineEvent, None]:
        if routed is None:
            routed = await self.route(request.question, request.mode, request.response_format)
        wants_reasoning = routed.decision.decision == "vision_then_reasoning"
        witness = None
        if wants_reasoning and self._witness is not None:  # beside the vision stage; awaited only at arbitration
            witness = WitnessReading.start(self._witness, request.image, self._witness_timeout_s)
        try:
            yield RouteEvent(routed.decision)
            timings = {"route": routed.ms}
            vision_started = time.perf_counter()
            vision = await self._look(request, "describe" if wants_reasoning else "answer")
            timings["vision"] = _ms_since(vision_started)
            yield VisionEvent(vision)
            spend = Spend()
            if vision is not request.description:  # a session's kept description costs no generation
                spend.looked(vision)
            context = Context(
                vision, routed.decision, self._router.threshold, request.profile, detect_language(request.question),
                request.image, request.response_format, request.question, spend, witness,
            )  # fmt: skip
            if not wants_reasoning:
                yield DoneEvent(_vision_outcome(context, _vision_answer(vision), timings, routed.started))
                return
            async with aclosing(self._reasoned(request, context, timings, routed.started, streaming)) as events:
                async for event in events:
                    yield event
        finally:
            if witness is not None:
                witness.cancel()

    async def _reasoned(
        self, request: AnalyzeInput, context: Context, timings: dict[str, float], started: float, streaming: bool
    ) -> AsyncGenerator[PipelineEvent, None]:
        """The reasoning route once the vision stage has looked: the answer, then its arbitration, or the fallback."""
        reasoning_started = time.perf_counter()
        reasoning: _ReasoningOutcome | None = None
        async with aclosing(self._reason(request, context, streaming)) as items:
            async for item in items:
                if isinstance(item, _ReasoningOutcome):
                    reasoning = item
                else:
                    yield item
        assert reasoning is not None  # `_reason` always ends with its outcome
        timings["reasoning"] = _ms_since(reasoning_started)
        if reasoning.result is None:
            fallback_started = time.perf_counter()
            stand_in = await self._look(request, "answer")
            _spend(context).looked(stand_in)
            answer = _vision_answer(stand_in)
            timings["vision_answer"] = _ms_since(fallback_started)
            outcome = _vision_outcome(context, answer, timings, started, reasoning)
            yield DoneEvent(outcome, replaced=reasoning.streamed)
            return
        arbitration_started = time.perf_counter()
        judged = await self._arbiter.judge(reasoning.result, reasoning.request, context)
        timings["arbitration"] = _ms_since(arbitration_started)
        timings["total"] = _ms_since(started)
        outcome = _reasoned_outcome(context, judged, timings)
        replaced = reasoning.streamed and judged.result is not reasoning.result
        yield ArbitrationEvent(judged.arbitration, outcome.answer, replaced)
        yield DoneEvent(outcome, replaced)

    async def _look(self, request: AnalyzeInput, task: VisionTask) -> VisionResult:
        if task == "describe" and request.description is not None:
            return request.description
        vision_request = VisionRequest(
            request.image, request.question, task=task, image_url=request.image_url, profile=request.profile
        )
        return await self._vision.generate(vision_request)

    async def _reason(
        self, request: AnalyzeInput, context: Context, streaming: bool
    ) -> AsyncGenerator[DeltaEvent | ErrorEvent | _ReasoningOutcome, None]:
        """The reasoning stage's answer as a `_ReasoningOutcome`, last; before it, when `streaming` and the backend
        streams, its deltas, and an `ErrorEvent` when it fails after some. A reasoning failure never raises."""
        reasoning_request = self._reasoning_request(request, context)
        received = Collected()
        language, backend = context.language, self._reasoning
        try:
            if streaming and isinstance(backend, StreamingReasoningBackend):
                deltas = backend.stream(reasoning_request)
                try:
                    async for delta in deltas:
                        received.add(delta)
                        if delta.text or delta.thinking:
                            yield DeltaEvent(delta.text, delta.thinking)
                finally:
                    await _aclose(deltas)
                result = received.result(backend.name, backend.model, where=f"the {backend.name} backend's stream")
            else:
                result = await backend.generate(reasoning_request)
        except ReasoningDisabled:
            yield _ReasoningOutcome(None, (notice("reasoning_disabled", language),), False, None, reasoning_request)
            return
        except ReasoningError as exc:
            log.warning("reasoning stage failed (backend %s): %s: %s", backend.name, type(exc).__name__, exc)
            failure = StageFailure("reasoning", backend.name, type(exc).__name__, str(exc))
            for item in _failed(failure, exc, type(exc).__name__, language, reasoning_request, received):
                yield item
            return
        _spend(context).reasoned(result)
        degenerate = degeneration(result.text, request.question)
        if degenerate is not None:
            failure = StageFailure("reasoning", backend.name, "DegenerateAnswer", WHAT[degenerate])
            unusable = ReasoningInvalidOutput(f"the {backend.name} backend's model gave no answer: {WHAT[degenerate]}")
            for item in _failed(failure, unusable, WHAT[degenerate], language, reasoning_request, received):
                yield item
            return
        yield _ReasoningOutcome(result, (), False, None, reasoning_request, streamed=any(received.text))

    def _reasoning_request(self, request: AnalyzeInput, context: Context) -> ReasoningRequest:
        """Instructions, the conversation so far, then the description and the question."""
        system, *question = reasoning_messages(
            context.vision, request.question, request.profile, context.language, request.response_format
        )
        temperature = self._settings.temperature if request.temperature is None else request.temperature
        return ReasoningRequest(
            (system, *request.history, *question),
            max_new_tokens=request.max_new_tokens or self._settings.max_new_tokens,
            temperature=temperature,
            sampling=request.sampling,
        )


def _failed(
    failure: StageFailure,
    error: ReasoningError,
    detail: str,
    language: Language,
    request: ReasoningRequest,
    received: Collected,
) -> tuple[ErrorEvent | _ReasoningOutcome, ...]:
    """A failed reasoning stage: the fallback's outcome, after an `ErrorEvent` when deltas were already yielded."""
    text = notice("reasoning_failed", language, detail=f"{failure.backend}: {detail}")
    outcome = _ReasoningOutcome(None, (text,), True, failure, request, streamed=any(received.text))
    return (ErrorEvent(failure, error), outcome) if received.anything else (outcome,)


async def _aclose(iterator: AsyncIterator[object]) -> None:
    """Close an async generator (a backend's stream), so an abandoned answer stops being generated."""
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()


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
        degraded=context.vision.fallback is not None,
        notices=(*_stood_in(context), *notices, *_truncation(judged.result, context.language)),
        disclaimer=disclaimer(context.profile, context.language),
        needs_human_review=review,
        timings_ms=timings,
        confidence=judged.arbitration.confidence,
        arbitration=judged.arbitration,
        answer_fields=fields,
        failures=_vision_failure(context.vision),
        usage=_spend(context).usage(),
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
        degraded=(reasoning is not None and reasoning.degraded) or context.vision.fallback is not None,
        notices=(*_stood_in(context), *(reasoning.notices if reasoning else ())),
        disclaimer=disclaimer(context.profile, context.language),
        needs_human_review=review,
        timings_ms=timings,
        confidence=score,
        failures=(*_vision_failure(context.vision), *((reasoning.failure,) if reasoning and reasoning.failure else ())),
        usage=_spend(context).usage(),
    )


def _spend(context: Context) -> Spend:
    """The request's `Spend` (the pipeline always gives its context one)."""
    assert context.spend is not None
    return context.spend


def _stood_in(context: Context) -> tuple[str, ...]:
    """The notice of a vision backend that answered in place of the configured one (a degraded answer)."""
    why = context.vision.fallback
    if why is None:
        return ()
    texts = {"backend": why.backend, "detail": why.error_type, "fallback": context.vision.backend}
    return (notice("vision_fallback", context.language, **texts),)


def _vision_failure(vision: VisionResult) -> tuple[StageFailure, ...]:
    """The configured vision backend's failure, when a fallback answered in its place."""
    why = vision.fallback
    return (StageFailure("vision", why.backend, why.error_type, why.message),) if why else ()


def _truncation(result: ReasoningResult, language: Language) -> tuple[str, ...]:
    return (notice("reasoning_truncated", language),) if result.finish_reason == "length" else ()


def _vision_answer(vision: VisionResult) -> str:
    return vision.answer if vision.answer else vision.caption


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 2)
