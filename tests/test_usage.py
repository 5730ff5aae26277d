"""`usage` counts every generation a request caused: the first answer, a re-ask, the arbiter's probes, the vision
answer standing in for an unusable one; in the JSON and in streams."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from orchestrator.analysis.pipeline import Pipeline
from orchestrator.analysis.routing import KeywordRouter
from orchestrator.analysis.types import AnalyzeInput, AnalyzeOutcome, StageUsage
from orchestrator.api.app import create_app
from orchestrator.settings import RouterSettings, Settings
from orchestrator.stage_settings import LocalReasoningSettings
from orchestrator.wiring import Backends
from tests.fakes import FakeReasoning, FakeVision
from tests.images import decoded, png_bytes
from vision_stage.types import VisionRequest, VisionResult


@dataclass
class CountingVision(FakeVision):
    """A fake vision backend that reports 100 prompt tokens and 7 completion tokens per look."""

    async def generate(self, request: VisionRequest) -> VisionResult:
        result = await super().generate(request)
        return VisionResult(**{**result.__dict__, "prompt_tokens": 100, "completion_tokens": 7})


async def run(vision: FakeVision, reasoning: FakeReasoning, question: str, probes: int = 0) -> AnalyzeOutcome:
    pipeline = Pipeline(vision, reasoning, LocalReasoningSettings(), KeywordRouter(), probe_limit=probes)
    return await pipeline.run(AnalyzeInput(decoded(), question, mode="reasoning"))


def tokens(reasoning: FakeReasoning, answers: tuple[str, ...]) -> StageUsage:
    """What `FakeReasoning` reports for these answers: prompt words, answer words."""
    prompts = [sum(len(m.content.split()) for m in request.messages) for request in reasoning.requests]
    return StageUsage(len(answers), sum(prompts), sum(len(answer.split()) for answer in answers))


async def test_a_re_ask_is_counted_with_the_first_answer() -> None:
    answers = ("The total is 8.00.", "The total is 54.06.")
    reasoning = FakeReasoning(script=answers)
    outcome = await run(CountingVision(), reasoning, "Is this bill reasonable?")
    assert outcome.arbitration is not None
    assert outcome.arbitration.status == "corrected"
    vision, spent = outcome.usage
    assert spent == tokens(reasoning, answers)
    assert vision == StageUsage(1, 100, 7)


async def test_probes_are_counted_as_vision_generations() -> None:
    vision = CountingVision(replies=lambda _: "Yes, there is one person.")
    outcome = await run(
        vision, FakeReasoning(answer="Yes, and there is a person at the counter."), "Is this normal?", 3
    )
    looked, _ = outcome.usage
    assert looked == StageUsage(2, 200, 14)  # the description, then one probe


async def test_an_unusable_answer_and_the_vision_answer_standing_in_are_counted() -> None:
    loop = "because the tax is added and " * 8
    reasoning = FakeReasoning(answer=loop)
    outcome = await run(CountingVision(), reasoning, "Why is the total higher?")
    assert outcome.degraded
    looked, spent = outcome.usage
    assert looked == StageUsage(2, 200, 14)  # the description, then the answer standing in
    assert (spent.calls, spent.completion_tokens) == (1, len(loop.split()))


@pytest.mark.parametrize("stream", [False, True])
def test_the_api_reports_the_sum_and_each_stage(stream: bool) -> None:
    answers = ("The total is 8.00.", "The total is 54.06.")
    reasoning = FakeReasoning(script=answers)
    app = create_app(Settings(router=RouterSettings(kind="keyword")), Backends(CountingVision(), reasoning))
    with TestClient(app) as client:
        files = {"image": ("r.png", png_bytes(), "image/png")}
        data = {"question": "Is this bill reasonable?", "mode": "reasoning", "stream": str(stream).lower()}
        response = client.post("/v1/analyze", files=files, data=data)
    assert response.status_code == 200
    if stream:
        done = [block for block in response.text.split("\n\n") if block.startswith("event: done")][-1]
        usage = json.loads(done.split("data: ", 1)[1])["usage"]
    else:
        usage = response.json()["usage"]
    spent = tokens(reasoning, answers)
    assert usage["reasoning"] == {"calls": 2, "prompt_tokens": spent.prompt_tokens, "completion_tokens": 8}
    assert usage["vision"] == {"calls": 1, "prompt_tokens": 100, "completion_tokens": 7}
    assert usage["prompt_tokens"] == spent.prompt_tokens + 100
    assert usage["completion_tokens"] == 8 + 7
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_a_session_follow_up_reusing_the_kept_description_costs_no_vision_generation() -> None:
    vision = CountingVision()
    first = await run(vision, FakeReasoning(), "Why is the total 54.06?")
    kept = first.vision
    pipeline = Pipeline(vision, FakeReasoning(), LocalReasoningSettings(), KeywordRouter())
    follow_up = await pipeline.run(AnalyzeInput(decoded(), "And the tax?", mode="reasoning", description=kept))
    looked, spent = follow_up.usage
    assert looked == StageUsage(0, 0, 0)
    assert spent.calls == 1
    assert len(vision.requests) == 1
