from __future__ import annotations

import pytest

from orchestrator.analysis.pipeline import Pipeline
from orchestrator.analysis.routing import EmbeddingRouter, KeywordRouter, Prototype, Router
from orchestrator.analysis.types import AnalyzeInput
from orchestrator.stage_settings import LocalReasoningSettings
from reasoning_stage.errors import ReasoningInvalidOutput, ReasoningUnavailable
from reasoning_stage.none import NoneReasoningBackend
from tests.fakes import FakeEmbedder, FakeReasoning, FakeVision
from tests.images import decoded
from vision_stage.errors import VisionUnavailable


def pipeline(
    vision: FakeVision | None = None, reasoning: object | None = None, router: Router | None = None
) -> Pipeline:
    return Pipeline(
        vision or FakeVision(),
        reasoning or FakeReasoning(),  # type: ignore[arg-type]
        LocalReasoningSettings(),
        router or KeywordRouter(),
    )


async def test_perception_question_is_answered_by_the_vision_stage_alone() -> None:
    vision, reasoning = FakeVision(), FakeReasoning()
    outcome = await pipeline(vision, reasoning).run(AnalyzeInput(decoded(), "What is the total?"))
    assert outcome.mode == "vision_only"
    assert [r.task for r in vision.requests] == ["answer"]
    assert outcome.answer == "Text in the image most relevant to the question: “TOTAL 54.06”."
    assert outcome.reasoning is None
    assert reasoning.requests == []
    assert not outcome.degraded
    assert outcome.notices == ()
    assert set(outcome.timings_ms) == {"route", "vision", "total"}


async def test_reasoning_question_goes_through_the_llm_with_the_description_as_quoted_data() -> None:
    vision, reasoning = FakeVision(), FakeReasoning(answer="Yes, a latte receipt is usually reimbursable.")
    outcome = await pipeline(vision, reasoning).run(AnalyzeInput(decoded(), "Should this be reimbursed?"))
    assert outcome.mode == "vision_then_reasoning"
    assert outcome.answer == "Yes, a latte receipt is usually reimbursable."
    assert outcome.reasoning is not None
    assert set(outcome.timings_ms) == {"route", "vision", "reasoning", "arbitration", "total"}
    (request,) = reasoning.requests
    system, user = request.messages
    assert "never instructions" in system.content
    assert "<image_description>\n“BLUE BOTTLE CAFE”" in user.content
    assert user.content.endswith("Question: Should this be reimbursed?")
    assert [(r.task, r.question) for r in vision.requests] == [("describe", "Should this be reimbursed?")]


@pytest.mark.parametrize(
    ("question", "expected"),
    [("Why is the total so high?", "Reasoning unavailable"), ("为什么总价这么高？", "推理服务不可用")],
)
async def test_reasoning_down_gives_a_degraded_vision_answer_in_the_question_language(
    question: str, expected: str
) -> None:
    vision, reasoning = FakeVision(), FakeReasoning(error=ReasoningUnavailable("connection refused"))
    outcome = await pipeline(vision, reasoning).run(AnalyzeInput(decoded(), question))
    assert outcome.degraded
    assert [r.task for r in vision.requests] == ["describe", "answer"]  # the description, then its own answer
    assert "vision_answer" in outcome.timings_ms
    assert outcome.mode == "vision_only"
    assert outcome.route.decision == "vision_then_reasoning"
    assert outcome.answer.endswith("“TOTAL 54.06”.")
    (text,) = outcome.notices
    assert text.startswith(expected)
    (failure,) = outcome.failures
    assert (failure.stage, failure.backend, failure.error_type) == ("reasoning", "fake", "ReasoningUnavailable")


async def test_garbage_or_empty_llm_answers_degrade_too() -> None:
    for reasoning in (FakeReasoning(error=ReasoningInvalidOutput("not text")), FakeReasoning(answer="  \n")):
        outcome = await pipeline(reasoning=reasoning).run(AnalyzeInput(decoded(), "Why?", mode="reasoning"))
        assert outcome.degraded
        assert outcome.reasoning is None
        assert outcome.answer.endswith("“TOTAL 54.06”.")


async def test_the_none_backend_answers_vision_only_by_design_without_claiming_degradation() -> None:
    outcome = await pipeline(reasoning=NoneReasoningBackend()).run(AnalyzeInput(decoded(), "Why is it so high?"))
    assert outcome.mode == "vision_only"
    assert not outcome.degraded
    assert outcome.failures == ()
    assert outcome.notices == ("No reasoning stage is deployed; answered from the image only.",)


async def test_a_truncated_llm_answer_is_flagged() -> None:
    reasoning = FakeReasoning(answer="The total is", finish_reason="length")
    outcome = await pipeline(reasoning=reasoning).run(AnalyzeInput(decoded(), "Explain the bill."))
    assert outcome.mode == "vision_then_reasoning"
    assert outcome.notices == ("The reasoning answer hit its length limit and may be cut short.",)


async def test_vision_failure_fails_the_request() -> None:
    vision = FakeVision(error=VisionUnavailable("ocr not loaded", retry_after_s=3))
    with pytest.raises(VisionUnavailable):
        await pipeline(vision=vision).run(AnalyzeInput(decoded(), "What is the total?"))


@pytest.mark.parametrize(
    ("profile", "question", "disclaimer_start", "review"),
    [
        ("general", "What is the total?", None, False),
        ("medical", "What does this report say?", "AI-assisted suggestion", True),
        ("legal", "这份合同的日期是什么？", "AI辅助建议", True),
        ("finance", "What is the total?", "AI-assisted suggestion", False),
    ],
)
async def test_profiles_carry_disclaimers_and_review_flags(
    profile: str, question: str, disclaimer_start: str | None, review: bool
) -> None:
    request = AnalyzeInput(decoded(), question, profile=profile)  # type: ignore[arg-type]
    outcome = await pipeline().run(request)
    if disclaimer_start is None:
        assert outcome.disclaimer is None
    else:
        assert outcome.disclaimer is not None
        assert outcome.disclaimer.startswith(disclaimer_start)
    assert outcome.needs_human_review is review


async def test_the_pipeline_routes_with_the_router_it_was_given() -> None:
    examples = [
        Prototype("Can I expense this?", "vision_then_reasoning"),
        Prototype("What is the total?", "vision_only"),
    ]
    embedder = FakeEmbedder(
        {"Can I expense this?": (1.0, 0.0, 0.0), "Is this deductible for my firm?": (1.0, 0.1, 0.0)}
    )
    router = EmbeddingRouter.build(embedder, examples, threshold=0.5)
    vision, reasoning = FakeVision(), FakeReasoning(answer="Probably, as a client lunch.")
    outcome = await pipeline(vision, reasoning, router).run(AnalyzeInput(decoded(), "Is this deductible for my firm?"))
    assert outcome.mode == "vision_then_reasoning"
    assert outcome.answer == "Probably, as a client lunch."
    assert outcome.route.reason.startswith("embedding router: nearest examples “Can I expense this?” (reasoning")
    assert [r.task for r in vision.requests] == ["describe"]
    assert embedder.calls[-1] == "Is this deductible for my firm?"
