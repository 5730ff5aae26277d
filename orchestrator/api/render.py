"""Rendering the pipeline's outcome as the public API's bodies (`orchestrator.api.schemas`): each response built
once, straight from the outcome. The parts every body shares are plain fields (`outcome_fields`, `usage_fields`),
validated once with the body that holds them, not model by model."""

from __future__ import annotations

from collections import Counter
from typing import Any

from orchestrator.analysis.types import AnalyzeOutcome
from orchestrator.api.schemas import (
    AnalyzeResponse,
    ArbitrationOut,
    CheckOut,
    EvidenceOut,
    ReasoningOut,
    VisionOut,
)
from orchestrator.arbitration.decision import Arbitration
from orchestrator.arbitration.verification import Check
from vision_stage.types import VisionResult


def analyze_response(
    outcome: AnalyzeOutcome,
    request_id: str,
    session_id: str | None = None,
    *,
    model: type[AnalyzeResponse] = AnalyzeResponse,
    **extra: Any,
) -> AnalyzeResponse:
    """The `/v1/analyze` response (or, with `model` and `extra`, a subclass of it: the stream's `done` event)."""
    reasoning = outcome.reasoning
    return model(
        **outcome_fields(outcome, request_id),
        session_id=session_id,
        vision=vision_out(outcome.vision),
        reasoning=ReasoningOut.model_validate(reasoning) if reasoning else None,
        usage=usage_fields(outcome),
        **extra,
    )


def outcome_fields(outcome: AnalyzeOutcome, request_id: str) -> dict[str, Any]:
    """What every rendering of an outcome shares (`AnalyzeResponse`, the chat completion's `orchestration`)."""
    return {
        "request_id": request_id,
        "answer": outcome.answer,
        "answer_fields": outcome.answer_fields,
        "mode": outcome.mode,
        "route": vars(outcome.route),
        "arbitration": arbitration_fields(outcome.arbitration),
        "confidence": outcome.confidence,
        "degraded": outcome.degraded,
        "notices": list(outcome.notices),
        "disclaimer": outcome.disclaimer,
        "needs_human_review": outcome.needs_human_review,
        "language": outcome.language,
        "failures": [vars(failure) for failure in outcome.failures],
        "timings_ms": outcome.timings_ms,
    }


def usage_fields(outcome: AnalyzeOutcome) -> dict[str, Any]:
    """The request's generations (`UsageOut`'s fields), summed over both stages and by stage."""
    vision, reasoning = outcome.usage
    prompt_tokens = vision.prompt_tokens + reasoning.prompt_tokens
    completion_tokens = vision.completion_tokens + reasoning.completion_tokens
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "vision": vars(vision),
        "reasoning": vars(reasoning),
    }


def arbitration_out(
    arbitration: Arbitration | None, *, model: type[ArbitrationOut] = ArbitrationOut, **extra: Any
) -> ArbitrationOut:
    """The arbitration's summary as `model` (a subclass of `ArbitrationOut` with `extra`: the stream's
    `arbitration` event)."""
    return model(**arbitration_fields(arbitration), **extra)


def arbitration_fields(arbitration: Arbitration | None) -> dict[str, Any]:
    """The arbitration's summary (`ArbitrationOut`'s fields)."""
    if arbitration is None:
        return {"status": "skipped", "reason": "no reasoning answer to check", "corrected": False, "checks": []}
    checks = [_check_out(check) for check in arbitration.checks]
    counts = Counter(check.verdict for check in checks)
    summary = ", ".join(f"{counts[v]} {v}" for v in ("supported", "contradicted", "unverifiable") if counts[v])
    reason = f"{len(checks)} claims checked against the image: {summary}" if checks else "no concrete claims to check"
    status = "needs_review" if arbitration.status == "contradicted" else arbitration.status
    return {"status": status, "reason": reason, "corrected": arbitration.corrected, "checks": checks}


def _check_out(check: Check) -> CheckOut:
    claim, evidence = check.claim, check.evidence
    return CheckOut(
        kind=claim.kind,
        claim=claim.text,
        value=claim.value,
        referent=claim.referent,
        verdict=check.verdict,
        reason=check.reason,
        evidence=EvidenceOut.model_validate(evidence) if evidence else None,
        witness=EvidenceOut.model_validate(check.witness) if check.witness else None,
    )


def vision_out(vision: VisionResult) -> VisionOut:
    return VisionOut.model_validate(vision)
