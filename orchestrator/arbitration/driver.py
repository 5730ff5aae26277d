"""The arbitration step of a request: check the reasoning answer's claims against what the vision stage saw, re-ask
the reasoning stage once when the answer contradicts the image, and decide.

The decisions are the pure functions of `orchestrator.arbitration.decision` over the checks of
`orchestrator.arbitration.verification`; this module does the I/O they need: the second reasoning call and, when
enabled, the yes/no probes of `orchestrator.arbitration.probes`. When the second call fails, the first answer is
returned with its conflicts spelled out and marked for review: a failed correction never fails the request.

Probes: with a `probe_limit` above 0 and the request's image in the `Context`, each answer's claims that the
evidence left `unverifiable` and a probe can settle are put to the vision stage (`answer` task), at most
`probe_limit` per answer, concurrently, after `verify_all` and before `decide` — so a contradiction a probe finds
re-asks the reasoning stage like any other. A probe whose call fails (a `VisionError`) or whose reply is neither yes
nor no leaves its check unverifiable; probes never fail the request.

The witness: with a `WitnessReading` in the `Context` (`orchestrator.arbitration.witness`), its lines are awaited
once per request, here, and join the evidence as the witness's rows, for the first answer and a re-asked one alike;
a witness that failed or is late leaves them out.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from orchestrator.analysis.degeneration import WHAT, degeneration
from orchestrator.analysis.messages import Language, Profile, notice
from orchestrator.analysis.routing import RouteDecision
from orchestrator.analysis.types import Spend
from orchestrator.arbitration.answer_json import ResponseFormat, answer_claims
from orchestrator.arbitration.claims import Claim, extract_claims
from orchestrator.arbitration.decision import (
    Arbitration,
    confidence,
    conflict_notice,
    decide,
    evidence_quality,
    needs_review,
    resolve,
)
from orchestrator.arbitration.evidence import Evidence, evidence_from_vision
from orchestrator.arbitration.probes import probe_question, probed_check
from orchestrator.arbitration.verification import Check, verify_all
from orchestrator.arbitration.witness import WitnessReading
from reasoning_stage.backend import ReasoningBackend
from reasoning_stage.errors import ReasoningError
from reasoning_stage.types import ChatMessage, ReasoningRequest, ReasoningResult
from vision_stage.backend import VisionBackend
from vision_stage.errors import VisionError
from vision_stage.types import DecodedImage, TextLine, VisionRequest, VisionResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Judged:
    """The answer to return (the first, or the re-asked one) with the arbitration that decided it."""

    result: ReasoningResult
    arbitration: Arbitration
    notices: tuple[str, ...]
    reasoning_calls: int


@dataclass(frozen=True)
class Context:
    """What the checks depend on besides the answer."""

    vision: VisionResult
    route: RouteDecision
    route_threshold: float
    profile: Profile
    language: Language
    image: DecodedImage | None = None
    """The image the probes show the vision stage; without it, nothing is probed."""
    response_format: ResponseFormat = "text"
    """`json`: the answer's claims are its fields' (`orchestrator.arbitration.answer_json`)."""
    question: str = ""
    """The user's question, which a degenerate re-asked answer may only restate."""
    spend: Spend | None = None
    """Where the re-ask and the probes are counted (`orchestrator.analysis.types.Spend`)."""
    witness: WitnessReading | None = None
    """The second witness's reading of the image, under way; without it, the vision stage is the only witness."""


def vision_confidence(context: Context) -> tuple[float, bool]:
    """(confidence, needs human review) of an answer with no LLM claims to check: the vision stage's own."""
    evidence = evidence_from_vision(context.vision)
    score = _confidence((), evidence, context)
    return score, needs_review(context.profile, score)


class Arbiter:
    """Judges reasoning answers; `vision` and `probe_limit` (probes per answer, 0 for none) enable the probes."""

    def __init__(self, reasoning: ReasoningBackend, vision: VisionBackend | None = None, probe_limit: int = 0) -> None:
        self._reasoning = reasoning
        self._vision = vision
        self._probe_limit = probe_limit if vision is not None else 0

    async def judge(self, first: ReasoningResult, request: ReasoningRequest, context: Context) -> Judged:
        evidence = evidence_from_vision(context.vision, await _witnessed(context))
        checks = await self._check(_claims(first.text, context), evidence, context)
        verdict = decide(
            checks,
            profile=context.profile,
            confidence=_confidence(checks, evidence, context),
            language=context.language,
        )
        if verdict.status != "contradicted" or verdict.correction_prompt is None:
            return Judged(first, verdict, (), 1)
        follow_up = ReasoningRequest(
            (*request.messages, ChatMessage("assistant", first.text), ChatMessage("user", verdict.correction_prompt)),
            max_new_tokens=request.max_new_tokens,
            temperature=request.temperature,
            sampling=request.sampling,
        )
        second = await self._ask_again(follow_up, context)
        if second is None:
            unresolved = _unresolved(verdict, context.language)
            return Judged(first, unresolved, (unresolved.notice,) if unresolved.notice else (), 2)
        second_checks = await self._check(_claims(second.text, context), evidence, context)
        final = resolve(
            verdict,
            second_checks,
            profile=context.profile,
            confidence=_confidence(second_checks, evidence, context),
            language=context.language,
        )
        notices = (final.notice,) if final.notice else (notice("answer_corrected", context.language),)
        return Judged(second, final, notices, 2)

    async def _check(self, claims: tuple[Claim, ...], evidence: Evidence, context: Context) -> tuple[Check, ...]:
        """The claims verified against the evidence, then the unverifiable ones a probe can settle probed."""
        checks = list(verify_all(claims, evidence))
        if self._probe_limit <= 0 or context.image is None:
            return tuple(checks)
        questions = [
            (index, question)
            for index, check in enumerate(checks)
            if check.verdict == "unverifiable" and (question := probe_question(check.claim, context.language))
        ][: self._probe_limit]
        image = context.image
        replies = await asyncio.gather(*(self._probe(image, question, context) for _, question in questions))
        for (index, question), reply in zip(questions, replies, strict=True):
            if reply is not None:
                checks[index] = probed_check(checks[index], question, reply)
        return tuple(checks)

    async def _probe(self, image: DecodedImage, question: str, context: Context) -> str | None:
        """The vision stage's reply to a probe, or None when it failed (logged)."""
        assert self._vision is not None  # only called with probes enabled, which needs a vision backend
        try:
            result = await self._vision.generate(VisionRequest(image, question, task="answer"))
        except VisionError as exc:
            log.warning("probing the vision stage (backend %s) failed: %s: %s", self._vision.name,
                        type(exc).__name__, exc)  # fmt: skip
            return None
        if context.spend is not None:
            context.spend.looked(result)
        return result.answer or ""

    async def _ask_again(self, request: ReasoningRequest, context: Context) -> ReasoningResult | None:
        """The re-asked answer, or None when it failed or is degenerate (`orchestrator.analysis.degeneration`): a re-ask
        passes the same checks as the first answer."""
        try:
            result = await self._reasoning.generate(request)
        except ReasoningError as exc:
            log.warning("re-asking the reasoning stage (backend %s) failed: %s", self._reasoning.name, exc)
            return None
        if context.spend is not None:
            context.spend.reasoned(result)
        degenerate = degeneration(result.text, context.question)
        if degenerate is not None:
            log.warning("the re-asked answer (backend %s) is unusable: %s", self._reasoning.name, WHAT[degenerate])
            return None
        return result


async def _witnessed(context: Context) -> tuple[TextLine, ...]:
    """The witness's lines (module docstring), or none."""
    reading = context.witness
    return (await reading.lines() or ()) if reading is not None else ()


def _claims(text: str, context: Context) -> tuple[Claim, ...]:
    if context.response_format == "json":
        return answer_claims(text, context.language)
    return extract_claims(text, context.language)


def _confidence(checks: tuple[Check, ...], evidence: Evidence, context: Context) -> float:
    route_score = None if context.route.forced else context.route.score
    return confidence(
        checks,
        evidence_quality=evidence_quality(evidence, checks),
        route_score=route_score,
        route_threshold=context.route_threshold,
    )


def _unresolved(verdict: Arbitration, language: Language) -> Arbitration:
    """The first answer kept, its contradictions unresolved: always a case for review."""
    text = conflict_notice(list(verdict.contradictions), language)
    return Arbitration("needs_review", verdict.checks, verdict.confidence, True, notice=text)
