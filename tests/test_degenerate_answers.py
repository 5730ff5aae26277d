"""Degenerate answers are caught: a loop, an empty answer or a restated question is never `agreed` or `corrected`;
the generation guards stop a loop early. On loops in English and Chinese, on the embedded model's real looping output
(`tests/recorded/smollm2_135m_loop.json`, captured from SmolLM2-135M-Instruct on the receipt fixture), and on a
degenerate re-ask."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from orchestrator.analysis.degeneration import degeneration
from orchestrator.analysis.pipeline import Pipeline
from orchestrator.analysis.routing import KeywordRouter
from orchestrator.analysis.types import AnalyzeInput
from orchestrator.api.app import create_app
from orchestrator.settings import CacheSettings, LimitSettings, RouterSettings, Settings
from orchestrator.stage_settings import LocalReasoningSettings
from orchestrator.stages.resilient import ResilientReasoning, ResilientVision
from orchestrator.wiring import Backends
from reasoning_stage.remote import RemoteReasoningBackend
from reasoning_stage.types import ChatMessage, ReasoningDelta, ReasoningRequest
from stage_protocol.loops import LOOP_NOTE, loop_stopper, loops, repeats_at_end
from tests.fakes import FakeReasoning, FakeStreamingReasoning, FakeVision
from tests.images import decoded, png_bytes
from tests.vllm_fake import FakeVllm, vllm_stream
from vision_stage.remote import RemoteVisionBackend
from vision_stage.types import VisionRequest

SMOLLM_LOOP = json.loads((Path(__file__).parent / "recorded" / "smollm2_135m_loop.json").read_text(encoding="utf-8"))
QUESTION = "Why is the total higher than the subtotal?"
LLM_MODEL, VISION_MODEL = "zai-org/GLM-4-9B-0414", "zai-org/GLM-4.6V-Flash"
EN_LOOP = "The total is higher because " + "the tax is added and " * 8
ZH_LOOP = "合计比小计高，" + "因为加上了服务费，" * 10
ZH_OK = "合计比小计高出 3.06 元，因为账单上加收了税费，小计为 51.00 元，税费为 3.06 元，所以合计为 54.06 元。"
EN_OK = (
    "The total is higher than the subtotal because tax of 3.06 was added: the subtotal is 51.00 and the receipt "
    "lists the tax on its own line, so the total comes to 54.06."
)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (SMOLLM_LOOP["answer"], "loops"),
        (EN_LOOP, "loops"),
        (ZH_LOOP, "loops"),
        ("", "empty"),
        (" … ** !! ", "empty"),
        (QUESTION, "restates"),
        (f"Question: {QUESTION}", "restates"),
        (EN_OK, None),
        (ZH_OK, None),
        ("54.06", None),
        ("No.", None),
        ("Latte 2 x 18.00 36.00. Latte 1 x 18.00 18.00. Scone 1 x 4.00 4.00. Total 58.00.", None),
    ],
)
def test_degenerate_answers_are_told_from_answers(answer: str, expected: str | None) -> None:
    assert degeneration(answer, QUESTION) == expected


@pytest.mark.parametrize(
    ("question", "answer"),
    [
        ("Total amount", "Total amount: $54.06"),
        ("price?", "price: 5"),
        ("总价？", "总价：54元"),
        ("Brand", "Brand: Nike"),
        ("Transcribe the sign.", "OPEN 9:00-17:00 MONDAY TO FRIDAY, CLOSED ON PUBLIC HOLIDAYS"),
    ],
)
def test_a_short_answer_that_repeats_the_question_s_words_is_still_an_answer(question: str, answer: str) -> None:
    assert degeneration(answer, question) is None


@pytest.mark.parametrize(
    "answer",
    [
        "\n".join(["| 2024-03-04 | Office | 09:00 | 17:00 | 8.0 h |"] * 6),
        "\n".join(["04/03 Card payment Coffee Shop Ltd London GBP 3.50"] * 6),
        "\n".join(["1x Bottled water 500ml 1.20"] * 6 + ["Total 7.20"]),
        "\n".join(f"- Row {i}: status OK, value within range, no action needed." for i in range(1, 9)),
    ],
)
def test_tables_statements_and_receipts_with_repeated_rows_are_not_loops(answer: str) -> None:
    assert not loops(answer)
    assert degeneration(answer, QUESTION) is None


def test_the_real_looping_output_of_the_embedded_model_is_a_loop_by_tokens_too() -> None:
    assert SMOLLM_LOOP["finish_reason"] == "length"  # it ran to its budget: what the guard now prevents
    assert loops(SMOLLM_LOOP["answer"])
    assert repeats_at_end(["a", "b", "c", "d", "e", "f"] * 8)
    assert not repeats_at_end(["a", "b", "c", "d", "e", "f"] * 7)  # seven times is not yet a loop
    assert not repeats_at_end(["no"] * 20)  # a short word said twenty times covers too little


def test_the_generation_guard_stops_a_loop_and_only_a_loop() -> None:
    stop = loop_stopper(prompt_length=3)
    looping = torch.tensor([[7, 7, 7, *([1, 2, 3, 4, 5, 6] * 8)], [7, 7, 7, *list(range(48))]])
    assert stop(looping, torch.zeros(2, 1)).tolist() == [True, False]
    prompt_only = torch.tensor([[5] * 40])  # a prompt that repeats is not the model looping
    assert loop_stopper(prompt_length=40)(prompt_only, torch.zeros(1, 1)).tolist() == [False]


async def ask(reasoning: FakeReasoning, question: str = QUESTION) -> tuple[object, FakeReasoning]:
    pipeline = Pipeline(FakeVision(), reasoning, LocalReasoningSettings(), KeywordRouter())
    return await pipeline.run(AnalyzeInput(decoded(), question, mode="reasoning")), reasoning


@pytest.mark.parametrize("answer", [SMOLLM_LOOP["answer"], ZH_LOOP, "", QUESTION])
async def test_a_degenerate_first_answer_is_replaced_by_the_vision_answer_marked_degraded(answer: str) -> None:
    outcome, _ = await ask(FakeReasoning(answer=answer))
    assert outcome.mode == "vision_only"  # type: ignore[attr-defined]
    assert outcome.degraded  # type: ignore[attr-defined]
    assert outcome.arbitration is None  # type: ignore[attr-defined]
    assert answer not in outcome.answer or not answer  # type: ignore[attr-defined]
    [failure] = outcome.failures  # type: ignore[attr-defined]
    assert failure.error_type == "DegenerateAnswer"
    assert any("Reasoning unavailable" in text or "推理服务不可用" in text for text in outcome.notices)  # type: ignore[attr-defined]


async def test_a_degenerate_re_ask_is_never_corrected_but_sent_to_review() -> None:
    outcome, reasoning = await ask(FakeReasoning(script=("The total is 8.00.", EN_LOOP)), "Is this bill reasonable?")
    arbitration = outcome.arbitration  # type: ignore[attr-defined]
    assert arbitration is not None
    assert arbitration.status == "needs_review"
    assert not arbitration.corrected
    assert outcome.needs_human_review  # type: ignore[attr-defined]
    assert outcome.answer == "The total is 8.00."  # type: ignore[attr-defined]
    assert len(reasoning.requests) == 2


# --- remote streams: the guard leaves a looping stream, which stops the server's generation --------------------------


async def test_a_remote_reasoning_stream_that_loops_is_left_early() -> None:
    pieces = ["The total is higher because "] + ["the tax is added and "] * 200
    fake = FakeVllm(LLM_MODEL, [vllm_stream(LLM_MODEL, pieces)])
    backend = await RemoteReasoningBackend.load(
        base_url="http://llm.test/v1", model=LLM_MODEL, http_client=fake.client()
    )
    deltas = [delta async for delta in backend.stream(ReasoningRequest((ChatMessage("user", QUESTION),), 2048))]
    await backend.aclose()
    text = "".join(delta.text for delta in deltas)
    assert deltas[-1].finish_reason == "stop"
    assert len(text) < len("".join(pieces)) // 4, "it read on through the loop"
    assert degeneration(text, QUESTION) == "loops"


async def test_a_remote_vision_answer_that_loops_is_cut_with_a_note() -> None:
    pieces = ["The receipt shows "] + ["a latte and a latte and "] * 200
    fake = FakeVllm(VISION_MODEL, [vllm_stream(VISION_MODEL, pieces)])
    backend = await RemoteVisionBackend.load(
        base_url="http://vlm.test/v1", model=VISION_MODEL, http_client=fake.client(), max_new_tokens=4096
    )
    result = await backend.generate(VisionRequest(decoded(), QUESTION, task="answer"))
    await backend.aclose()
    assert LOOP_NOTE in result.notes
    assert result.answer is not None
    assert len(result.answer) < len("".join(pieces)) // 4


@dataclass
class Trickle(FakeStreamingReasoning):
    """A reasoning stage that streams a word every 0.5 s, forever."""

    async def stream(self, request: ReasoningRequest) -> AsyncGenerator[ReasoningDelta, None]:
        self.requests.append(request)
        for index in range(10_000):
            yield ReasoningDelta(text=f" w{index}")
            await asyncio.sleep(0.5)


def test_a_trickling_stream_leaves_the_reserve_to_the_vision_answer() -> None:
    """The reads of a streamed answer are bounded by the deadline less the reserve, as an attempt is: the vision
    answer that stands in still has its time."""
    settings = Settings(
        router=RouterSettings(kind="keyword"),
        cache=CacheSettings(enabled=False),
        limits=LimitSettings(request_deadline_s=4.0, fallback_reserve_s=2.0),
    )
    vision = ResilientVision([("fake", FakeVision())], settings.vision)
    reasoning = ResilientReasoning([("fake", Trickle())], settings.reasoning, reserve_s=2.0)
    body = {"image_base64": base64.b64encode(png_bytes()).decode(), "question": "Why 54.06?", "mode": "reasoning"}
    with TestClient(create_app(settings, Backends(vision, reasoning))) as client:
        response = client.post("/v1/analyze", json={**body, "stream": True})
    done = [block for block in response.text.split("\n\n") if block.startswith("event: done")]
    assert done, "the stream ended without its answer"
    outcome = json.loads(done[-1].split("data: ", 1)[1])
    assert (outcome["degraded"], outcome["mode"]) == (True, "vision_only")
