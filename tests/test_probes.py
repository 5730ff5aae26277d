"""Targeted yes/no probes: the questions and the reading of replies (pure), and the arbiter putting them to a vision
stage that answers questions, in both languages, with scripted fakes."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from orchestrator.analysis.pipeline import Pipeline
from orchestrator.analysis.routing import KeywordRouter
from orchestrator.analysis.types import AnalyzeInput, AnalyzeOutcome
from orchestrator.api.app import create_app
from orchestrator.arbitration.claims import extract_claims
from orchestrator.arbitration.probes import parse_reply, probe_question
from orchestrator.arbitration.verification import Check
from orchestrator.settings import ArbitrationSettings, Settings
from orchestrator.stage_settings import (
    GlmVisionSettings,
    LocalReasoningSettings,
    OcrVisionSettings,
    RemoteVisionSettings,
    VisionSettings,
)
from orchestrator.wiring import Backends, probe_limit
from tests.fakes import FakeReasoning, FakeVision
from tests.images import decoded, png_bytes
from vision_stage.errors import VisionUnavailable


@pytest.mark.parametrize(
    ("answer", "language", "question"),
    [
        ("There is a person at the counter.", "en", "Is there a person in the image? Answer yes or no."),
        ("There is no signature.", "en", "Is there a signature in the image? Answer yes or no."),
        ("I see two people.", "en", "Are there exactly 2 people in the image? Answer yes or no."),
        ("The price of coffee is 25.00.", "en", "Does the image show the coffee as 25.00? Answer yes or no."),
        ("图中没有人。", "zh", "图中有人吗？请回答是或否。"),
        ("图中有两个人。", "zh", "图中恰好有2个人吗？请回答是或否。"),
        ("合计是54.06元。", "zh", "图中的合计是54.06元吗？请回答是或否。"),
    ],
)
def test_probe_questions_ask_about_the_claim_in_the_question_language(
    answer: str, language: str, question: str
) -> None:
    (claim,) = extract_claims(answer, "zh" if language == "zh" else "en")
    assert probe_question(claim, "zh" if language == "zh" else "en") == question


def test_claims_a_probe_cannot_settle_get_no_question() -> None:
    (quote,) = extract_claims("The sign says “NO PARKING”.", "en")
    (date,) = extract_claims("It is dated 2026-03-14.", "en")
    (bare,) = extract_claims("54.06", "en")
    assert [probe_question(claim, "en") for claim in (quote, date, bare)] == [None, None, None]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Yes.", True),
        ("yes, there is a person on the left", True),
        ("Answer: No", False),
        ("No, there is nobody.", False),
        ("The answer is yes.", True),
        ("是的，图中有一个人。", True),
        ("是", True),
        ("有。", True),
        ("图中有一个人。", True),
        ("否", False),
        ("不是，合计是54.06元。", False),
        ("没有。", False),
        ("图片中没有人。", False),
        ("答：不对", False),
        ("The image shows a receipt.", None),
        ("一张收据。", None),
        ("", None),
        ("Yes and no.", None),
    ],
)
def test_replies_are_read_as_yes_no_or_nothing(reply: str, expected: bool | None) -> None:
    assert parse_reply(reply) is expected


async def ask(
    vision: FakeVision, reasoning: FakeReasoning, question: str = "Is this a normal café?", limit: int = 3
) -> AnalyzeOutcome:
    pipeline = Pipeline(vision, reasoning, LocalReasoningSettings(), KeywordRouter(), probe_limit=limit)
    return await pipeline.run(AnalyzeInput(decoded(), question, mode="reasoning"))


def probes_sent(vision: FakeVision) -> list[str]:
    return [request.question or "" for request in vision.requests if request.task == "answer"]


def only_check(outcome: AnalyzeOutcome) -> Check:
    assert outcome.arbitration is not None
    (check,) = outcome.arbitration.checks
    return check


@pytest.mark.parametrize(
    ("question", "answer", "reply"),
    [
        ("Is this a normal café?", "Yes, and there is a person at the counter.", "Yes, there is one person."),
        ("这是普通的咖啡店吗？", "是的，图中有人在柜台前。", "是的。"),
    ],
)
async def test_a_probe_supports_an_object_claim_the_description_could_not(
    question: str, answer: str, reply: str
) -> None:
    vision = FakeVision(replies=lambda _: reply)
    reasoning = FakeReasoning(answer=answer)
    outcome = await ask(vision, reasoning, question)
    check = only_check(outcome)
    assert check.verdict == "supported"
    assert check.evidence is not None
    assert (check.evidence.source, check.evidence.where, check.evidence.text) == (
        "probe",
        probes_sent(vision)[0],
        reply,
    )
    assert outcome.arbitration is not None
    assert outcome.arbitration.status == "agreed"
    assert len(reasoning.requests) == 1


@pytest.mark.parametrize(
    ("question", "wrong", "right", "reply"),
    [
        ("Is this a normal café?", "Yes; there is a dog under the table.", "It is a café receipt.", "No."),
        ("这是普通的咖啡店吗？", "是的，图中有一只狗。", "这是一张咖啡店的小票。", "没有。"),
    ],
)
async def test_a_probe_contradiction_re_asks_the_reasoning_stage(
    question: str, wrong: str, right: str, reply: str
) -> None:
    vision = FakeVision(replies=lambda _: reply)
    reasoning = FakeReasoning(script=(wrong, right))
    outcome = await ask(vision, reasoning, question)
    assert outcome.answer == right
    assert outcome.arbitration is not None
    assert (outcome.arbitration.status, outcome.arbitration.corrected) == ("corrected", True)
    correction = reasoning.requests[1].messages[-1].content
    assert reply in correction  # the re-ask cites what the vision stage said, and what it was asked
    assert ("asked “Is there a dog in the image?" in correction) or ("问视觉模型“图中有狗吗" in correction)


async def test_a_wrong_number_with_a_referent_is_probed_and_re_asked() -> None:
    vision = FakeVision(replies=lambda q: "No, coffee is not listed." if "coffee" in q else "Yes.")
    reasoning = FakeReasoning(script=("The price of coffee is 25.00.", "The total is 54.06."))
    outcome = await ask(vision, reasoning)
    assert probes_sent(vision) == ["Does the image show the coffee as 25.00? Answer yes or no."]
    assert outcome.arbitration is not None
    assert outcome.arbitration.corrected


@pytest.mark.parametrize("reply", ["The image shows a receipt.", "一张收据。"])
async def test_a_reply_that_is_neither_yes_nor_no_leaves_the_claim_unverifiable(reply: str) -> None:
    vision = FakeVision(replies=lambda _: reply)
    outcome = await ask(vision, FakeReasoning(answer="There is a person at the counter."))
    check = only_check(outcome)
    assert (check.verdict, check.evidence) == ("unverifiable", None)
    assert len(probes_sent(vision)) == 1


async def test_a_failing_probe_leaves_the_claim_unverifiable_and_the_request_answered() -> None:
    def broken(question: str) -> str:
        raise VisionUnavailable("the vision server went away")

    vision = FakeVision(replies=broken)
    outcome = await ask(vision, FakeReasoning(answer="图中有人在柜台前。"), "这是普通的咖啡店吗？")
    assert only_check(outcome).verdict == "unverifiable"
    assert outcome.answer == "图中有人在柜台前。"
    assert not outcome.degraded
    assert "arbitration" in outcome.timings_ms


async def test_no_more_probes_than_the_limit_and_none_for_supported_claims() -> None:
    answer = "There is a person, a dog, a cat, a bicycle and a tree. The total is 54.06."
    vision = FakeVision(replies=lambda _: "Yes.")
    outcome = await ask(vision, FakeReasoning(answer=answer), limit=2)
    assert len(probes_sent(vision)) == 2
    assert outcome.arbitration is not None
    verdicts = [(check.claim.value, check.verdict) for check in outcome.arbitration.checks]
    assert verdicts.count(("54.06", "supported")) == 1  # settled by the text, never probed
    assert sum(verdict == "supported" for _, verdict in verdicts) == 3
    none = FakeVision(replies=lambda _: "Yes.")
    await ask(none, FakeReasoning(answer=answer), limit=0)
    assert probes_sent(none) == []


VISION: dict[str, VisionSettings] = {
    "ocr": OcrVisionSettings(),
    "glm": GlmVisionSettings(model="m"),
    "remote": RemoteVisionSettings(model="m", base_url="http://127.0.0.1:1/v1"),
}


@pytest.mark.parametrize(
    ("backend", "probes", "expected"),
    [("ocr", "auto", 0), ("glm", "auto", 3), ("remote", "auto", 3), ("ocr", "on", 3), ("glm", "off", 0)],
)
def test_auto_probes_only_vision_backends_that_answer_questions(backend: str, probes: str, expected: int) -> None:
    arbitration = ArbitrationSettings.model_validate({"probes": probes})
    assert probe_limit(Settings(vision=VISION[backend], arbitration=arbitration)) == expected


@pytest.mark.parametrize(("backend", "probed"), [("ocr", False), ("glm", True)])
def test_the_app_probes_according_to_the_configured_vision_backend(backend: str, probed: bool) -> None:
    settings = Settings(vision=VISION[backend])
    vision = FakeVision(replies=lambda _: "Yes.")
    backends = Backends(vision, FakeReasoning(answer="There is a person at the counter."))
    with TestClient(create_app(settings, backends)) as client:
        response = client.post(
            "/v1/analyze",
            files={"image": ("x.png", png_bytes(), "image/png")},
            data={"question": "Is this a normal café?", "mode": "reasoning"},
        )
    (check,) = response.json()["arbitration"]["checks"]
    assert check["verdict"] == ("supported" if probed else "unverifiable")
    assert len(probes_sent(vision)) == (1 if probed else 0)
