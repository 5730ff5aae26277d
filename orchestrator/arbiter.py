"""The arbitration step of a request: check the reasoning answer's claims against what the vision stage saw, re-ask
the reasoning stage once when the answer contradicts the image, and decide.

The decisions are the pure functions of `orchestrator.arbitration` over the checks of `orchestrator.verification`;
this module does the one piece of I/O they need, the second reasoning call. When that call fails, the first answer
is returned with its conflicts spelled out and marked for review: a failed correction never fails the request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from orchestrator.arbitration import (
    Arbitration,
    confidence,
    conflict_notice,
    decide,
    evidence_quality,
    needs_review,
    resolve,
)
from orchestrator.claims import extract_claims
from orchestrator.messages import Language, Profile, notice
from orchestrator.routing import RouteDecision
from orchestrator.verification import Check, Evidence, evidence_from_vision, verify_all
from reasoning_stage.backend import ReasoningBackend
from reasoning_stage.errors import ReasoningError
from reasoning_stage.types import ChatMessage, ReasoningRequest, ReasoningResult
from vision_stage.types import VisionResult

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


def vision_confidence(context: Context) -> tuple[float, bool]:
    """(confidence, needs human review) of an answer with no LLM claims to check: the vision stage's own."""
    evidence = evidence_from_vision(context.vision)
    score = _confidence((), evidence, context)
    return score, needs_review(context.profile, score)


class Arbiter:
    def __init__(self, reasoning: ReasoningBackend) -> None:
        self._reasoning = reasoning

    async def judge(self, first: ReasoningResult, request: ReasoningRequest, context: Context) -> Judged:
        evidence = evidence_from_vision(context.vision)
        checks = verify_all(extract_claims(first.text, context.language), evidence)
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
        )
        second = await self._ask_again(follow_up)
        if second is None:
            unresolved = _unresolved(verdict, context.language)
            return Judged(first, unresolved, (unresolved.notice,) if unresolved.notice else (), 2)
        second_checks = verify_all(extract_claims(second.text, context.language), evidence)
        final = resolve(
            verdict,
            second_checks,
            profile=context.profile,
            confidence=_confidence(second_checks, evidence, context),
            language=context.language,
        )
        notices = (final.notice,) if final.notice else (notice("answer_corrected", context.language),)
        return Judged(second, final, notices, 2)

    async def _ask_again(self, request: ReasoningRequest) -> ReasoningResult | None:
        try:
            result = await self._reasoning.generate(request)
        except ReasoningError as exc:
            log.warning("re-asking the reasoning stage (backend %s) failed: %s", self._reasoning.name, exc)
            return None
        return result if result.text.strip() else None


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
