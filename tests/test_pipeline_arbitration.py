"""The pipeline checks the LLM's claims against what the vision stage saw, re-asks once on a contradiction, and says
what it decided: every resolution path, in both languages, with scripted fake stages."""

from __future__ import annotations

import pytest

from orchestrator.analysis.messages import Profile
from orchestrator.analysis.pipeline import Pipeline
from orchestrator.analysis.routing import KeywordRouter
from orchestrator.analysis.types import AnalyzeInput, AnalyzeOutcome
from orchestrator.stage_settings import LocalReasoningSettings
from reasoning_stage.errors import ReasoningUnavailable
from tests.fakes import FakeReasoning, FakeVision
from tests.images import decoded

ZH_RECEIPT = ("蓝瓶咖啡", "拿铁 2 x 18.00 36.00", "合计 54.06")


async def ask(
    reasoning: FakeReasoning, question: str, *, lines: tuple[str, ...] | None = None, profile: Profile = "general"
) -> AnalyzeOutcome:
    vision = FakeVision() if lines is None else FakeVision(lines=lines)
    pipeline = Pipeline(vision, reasoning, LocalReasoningSettings(), KeywordRouter())
    return await pipeline.run(AnalyzeInput(decoded(), question, mode="reasoning", profile=profile))


async def test_an_answer_the_image_supports_is_agreed() -> None:
    reasoning = FakeReasoning(answer="The total is 54.06, so it is a normal café bill.")
    outcome = await ask(reasoning, "Why is this bill so high?")
    assert outcome.arbitration is not None
    assert outcome.arbitration.status == "agreed"
    (check,) = outcome.arbitration.checks
    assert (check.claim.kind, check.claim.value, check.verdict) == ("number", "54.06", "supported")
    assert check.evidence is not None
    assert "TOTAL 54.06" in check.evidence.text
    assert len(reasoning.requests) == 1
    assert not outcome.needs_human_review


@pytest.mark.parametrize(
    ("question", "lines", "wrong", "right", "expected_notice"),
    [
        ("Is this bill reasonable?", None, "The total is 8.00.", "The total is 54.06.", "contradicted the image"),
        ("这张小票合理吗？", ZH_RECEIPT, "合计是8.00元。", "合计是54.06元。", "更正"),
    ],
)
async def test_a_contradicted_answer_is_re_asked_once_and_corrected(
    question: str, lines: tuple[str, ...] | None, wrong: str, right: str, expected_notice: str
) -> None:
    reasoning = FakeReasoning(script=(wrong, right))
    outcome = await ask(reasoning, question, lines=lines)
    assert outcome.answer == right
    assert outcome.arbitration is not None
    assert (outcome.arbitration.status, outcome.arbitration.corrected) == ("corrected", True)
    assert any(expected_notice in text for text in outcome.notices)
    first, second = reasoning.requests
    assert second.messages[: len(first.messages)] == first.messages
    assert second.messages[-2].content == wrong
    assert "54.06" in second.messages[-1].content  # the correction states the evidence


async def test_an_answer_still_wrong_after_the_correction_is_returned_with_the_conflict_spelled_out() -> None:
    reasoning = FakeReasoning(script=("The total is 8.00.", "I insist: the total is 9.00."))
    outcome = await ask(reasoning, "Is this bill reasonable?")
    assert outcome.arbitration is not None
    assert outcome.arbitration.status == "needs_review"
    assert outcome.needs_human_review
    assert any("9.00" in text and "54.06" in text for text in outcome.notices)


async def test_a_failed_correction_keeps_the_first_answer_marked_for_review() -> None:
    reasoning = FakeReasoning(script=("The total is 8.00.", ReasoningUnavailable("gone")))
    outcome = await ask(reasoning, "Is this bill reasonable?")
    assert outcome.answer == "The total is 8.00."
    assert outcome.arbitration is not None
    assert outcome.arbitration.status == "needs_review"
    assert outcome.needs_human_review
    assert not outcome.degraded  # the LLM did answer; only its correction failed


@pytest.mark.parametrize("profile", ["medical", "legal"])
async def test_medical_and_legal_answers_always_go_to_review(profile: Profile) -> None:
    outcome = await ask(FakeReasoning(answer="The total is 54.06."), "Is this bill reasonable?", profile=profile)
    assert outcome.arbitration is not None
    assert outcome.arbitration.status == "needs_review"
    assert outcome.needs_human_review


async def test_confidence_falls_with_a_contradiction_and_vision_answers_are_not_arbitrated() -> None:
    agreed = await ask(FakeReasoning(answer="The total is 54.06."), "Is this bill reasonable?")
    kept_wrong = await ask(FakeReasoning(script=("The total is 8.00.", "The total is 9.00.")), "Is it fine?")
    assert 0.0 <= kept_wrong.confidence < agreed.confidence <= 1.0
    pipeline = Pipeline(FakeVision(), FakeReasoning(), LocalReasoningSettings(), KeywordRouter())
    vision_only = await pipeline.run(AnalyzeInput(decoded(), "What is the total?"))
    assert vision_only.arbitration is None
    assert 0.0 < vision_only.confidence <= 1.0
