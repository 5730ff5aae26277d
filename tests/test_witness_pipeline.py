"""The OCR witness in a request: started beside the vision stage on the reasoning route only, awaited at arbitration,
never failing a request; configured by `ORCH_ARBITRATION__WITNESS`; and, end to end through the HTTP API, the real
embedded OCR catching a vision model's misreading of a rendered receipt."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from orchestrator.analysis.pipeline import Pipeline
from orchestrator.analysis.routing import KeywordRouter, RequestedMode
from orchestrator.analysis.types import AnalyzeInput, AnalyzeOutcome
from orchestrator.api.app import create_app
from orchestrator.arbitration.verification import Check
from orchestrator.settings import ArbitrationSettings, Settings
from orchestrator.stage_settings import (
    GlmVisionSettings,
    LocalReasoningSettings,
    NoneReasoningSettings,
    OcrVisionSettings,
    ReasoningSettings,
    VisionSettings,
)
from orchestrator.wiring import Backends, witness_enabled
from reasoning_stage.errors import ReasoningUnavailable
from tests.fakes import FakeReasoning, FakeVision, FakeWitness
from tests.fixtures.make_fixtures import FIXTURE_TEXT, HERE
from tests.images import decoded, text_png
from vision_stage.errors import ImageCorrupt, VisionError, VisionInvalidOutput, VisionUnavailable
from vision_stage.ocr import OcrReader, RapidTextReader, TextReader
from vision_stage.types import TextLine, VisionRequest, VisionResult

MISREAD = ("BLUE BOTTLE CAFE", "Date: 2026-03-19", "Total: 90.00")
WRONG_TOTAL = "The total is 90.00."


@dataclass
class WaitingVision(FakeVision):
    """A vision stage that only answers once the witness has started reading: the two must run side by side."""

    witness: FakeWitness = field(default_factory=FakeWitness)

    async def generate(self, request: VisionRequest) -> VisionResult:
        await asyncio.wait_for(self.witness.started.wait(), 5)
        return await super().generate(request)


async def ask(
    witness: FakeWitness,
    reasoning: FakeReasoning,
    *,
    vision: FakeVision | None = None,
    mode: RequestedMode = "reasoning",
    timeout_s: float = 5.0,
) -> AnalyzeOutcome:
    pipeline = Pipeline(
        vision or FakeVision(lines=MISREAD),
        reasoning,
        LocalReasoningSettings(),
        KeywordRouter(),
        witness=witness,
        witness_timeout_s=timeout_s,
    )
    return await pipeline.run(AnalyzeInput(decoded(), "Is this bill right?", mode=mode))


def checks(outcome: AnalyzeOutcome) -> tuple[Check, ...]:
    assert outcome.arbitration is not None
    return outcome.arbitration.checks


async def test_a_contradiction_from_the_witness_re_asks_and_ends_in_review() -> None:
    reasoning = FakeReasoning(script=(WRONG_TOTAL, WRONG_TOTAL))
    outcome = await ask(FakeWitness(), reasoning)
    assert outcome.arbitration is not None
    assert outcome.arbitration.status == "needs_review"
    assert outcome.needs_human_review
    correction = reasoning.requests[1].messages[-1].content
    assert "TOTAL 80.00" in correction
    assert "Total: 90.00" in correction
    assert any("TOTAL 80.00" in text for text in outcome.notices)


async def test_the_witness_reads_beside_the_vision_stage() -> None:
    witness = FakeWitness()
    outcome = await ask(
        witness, FakeReasoning(answer=WRONG_TOTAL), vision=WaitingVision(lines=MISREAD, witness=witness)
    )
    assert len(witness.reads) == 1
    assert checks(outcome)[0].verdict == "contradicted"


async def test_the_vision_only_route_never_starts_the_witness() -> None:
    witness = FakeWitness()
    outcome = await ask(witness, FakeReasoning(), mode="vision")
    assert outcome.mode == "vision_only"
    assert witness.reads == []


async def test_a_failed_witness_leaves_the_verdicts_as_they_were(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    witness = FakeWitness(error=ImageCorrupt("the pixels would not decode"))
    outcome = await ask(witness, FakeReasoning(answer=WRONG_TOTAL))
    ((verdict, by_witness),) = [(check.verdict, check.witness) for check in checks(outcome)]
    assert (verdict, by_witness) == ("supported", None)
    assert outcome.arbitration is not None
    assert outcome.arbitration.status == "agreed"
    assert "witness failed: ImageCorrupt" in caplog.text


async def test_a_late_witness_is_not_waited_for_past_its_timeout(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    witness = FakeWitness(delay_s=30.0)
    started = time.perf_counter()
    outcome = await ask(witness, FakeReasoning(answer=WRONG_TOTAL), timeout_s=0.05)
    assert time.perf_counter() - started < 5.0
    assert checks(outcome)[0].verdict == "supported"
    assert "did not finish reading" in caplog.text
    await asyncio.sleep(0)
    assert witness.cancelled == 1


async def test_the_witness_is_cancelled_when_the_answer_comes_from_the_vision_stage() -> None:
    witness = FakeWitness(delay_s=30.0)
    vision = WaitingVision(lines=MISREAD, witness=witness)
    outcome = await ask(witness, FakeReasoning(error=ReasoningUnavailable("down")), vision=vision)
    assert outcome.degraded
    assert outcome.arbitration is None
    await asyncio.sleep(0)
    assert witness.cancelled == 1


async def test_the_witness_is_cancelled_when_the_vision_stage_fails() -> None:
    witness = FakeWitness(delay_s=30.0)
    with pytest.raises(VisionError):
        await ask(witness, FakeReasoning(), vision=WaitingVision(error=ImageCorrupt("bad"), witness=witness))
    await asyncio.sleep(0)
    assert witness.cancelled == 1


class BrokenReader:
    def read(self, image: Image.Image, /) -> tuple[TextLine, ...]:
        raise RuntimeError("onnxruntime fell over")


async def test_the_ocr_reader_raises_only_vision_errors() -> None:
    reader = OcrReader(BrokenReader())
    with pytest.raises(VisionInvalidOutput, match="onnxruntime fell over"):
        await reader.read(decoded())
    await reader.aclose()
    with pytest.raises(VisionUnavailable, match="closed"):
        await reader.read(decoded())


VISION: dict[str, VisionSettings] = {"ocr": OcrVisionSettings(), "glm": GlmVisionSettings(model="m")}


@pytest.mark.parametrize(
    ("vision", "reasoning", "witness", "expected"),
    [
        ("glm", LocalReasoningSettings(), "auto", True),
        ("ocr", LocalReasoningSettings(), "auto", False),  # the witness would be the same reader
        ("ocr", LocalReasoningSettings(), "ocr", True),
        ("glm", LocalReasoningSettings(), "off", False),
        ("glm", NoneReasoningSettings(), "auto", False),  # no LLM, no claims to check
        ("glm", NoneReasoningSettings(), "ocr", False),
    ],
)
def test_the_witness_setting_resolves_against_the_backends(
    vision: str, reasoning: ReasoningSettings, witness: str, expected: bool
) -> None:
    arbitration = ArbitrationSettings.model_validate({"witness": witness})
    assert witness_enabled(Settings(vision=VISION[vision], reasoning=reasoning, arbitration=arbitration)) is expected


def test_the_witness_is_configured_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().arbitration.witness == "auto"
    monkeypatch.setenv("ORCH_ARBITRATION__WITNESS", "off")
    monkeypatch.setenv("ORCH_ARBITRATION__WITNESS_TIMEOUT_S", "0.5")
    assert (Settings().arbitration.witness, Settings().arbitration.witness_timeout_s) == ("off", 0.5)
    monkeypatch.setenv("ORCH_ARBITRATION__WITNESS", "glm")
    with pytest.raises(ValueError, match="witness"):
        Settings()


# -- end to end: the real embedded OCR as the witness, through the HTTP API --


@pytest.fixture(scope="module")
def engine() -> TextReader:
    """RapidOCR, loaded once: each app gets its own `OcrReader` over it, which the app closes when it stops."""
    return RapidTextReader.load()


def rendered(texts: tuple[str, ...]) -> bytes:
    return text_png(texts, width=640, row=80, left=40, bottom=20)


def analyze(
    engine: TextReader, image: bytes, seen: tuple[str, ...], answers: tuple[str, ...], question: str
) -> dict[str, Any]:
    settings = Settings(arbitration=ArbitrationSettings(witness_timeout_s=60.0))
    backends = Backends(FakeVision(lines=seen), FakeReasoning(script=answers), witness=OcrReader(engine))
    with TestClient(create_app(settings, backends)) as client:
        response = client.post(
            "/v1/analyze",
            files={"image": ("receipt.png", image, "image/png")},
            data={"question": question, "mode": "reasoning"},
        )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


EN_RECEIPT = ("BLUE LOTUS CAFE", "Date: 2026-03-14", "Latte 2 x 18.00 36.00", "TOTAL 80.00")
EN_MISREAD = ("BLUE BOTTLE CAFE", "Date: 2026-03-19", "Latte 2 x 18.00 36.00", "TOTAL 90.00")
EN_ANSWER = "The receipt is from “Blue Bottle Cafe”. The date is 2026-03-19. The total is 90.00."
ZH_MISREAD = tuple(
    {"蓝瓶咖啡 上海店": "蓝杯咖啡 上海店", "2026-03-14 12:41": "2026-03-19 12:41", "TOTAL 54.06": "TOTAL 59.06"}.get(
        t, t
    )
    for t in FIXTURE_TEXT["receipt.png"]
)
ZH_ANSWER = "这是“蓝杯咖啡”的小票。日期是2026年3月19日。合计是59.06元。"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("image", "seen", "answer", "question", "read_by_witness"),
    [
        ("en", EN_MISREAD, EN_ANSWER, "Is this bill right?", ("LOTUS", "2026-03-14", "80.00")),
        ("zh", ZH_MISREAD, ZH_ANSWER, "这张小票对吗？", ("蓝瓶咖啡", "2026-03-14", "54.06")),
    ],
)
def test_the_real_ocr_witness_catches_a_vision_misreading_through_the_api(
    engine: TextReader,
    image: str,
    seen: tuple[str, ...],
    answer: str,
    question: str,
    read_by_witness: tuple[str, str, str],
) -> None:
    data = rendered(EN_RECEIPT) if image == "en" else (HERE / "receipt.png").read_bytes()
    body = analyze(engine, data, seen, (answer, answer), question)
    arbitration = body["arbitration"]
    assert arbitration["status"] == "needs_review"
    assert body["needs_human_review"]
    quote, date, total = arbitration["checks"]
    assert [check["kind"] for check in (quote, date, total)] == ["quote", "date", "number"]
    for check, truth in zip((quote, date, total), read_by_witness, strict=True):
        assert check["verdict"] == "contradicted"
        assert check["evidence"]["text"] in seen  # the vision stage's reading…
        assert check["witness"]["source"] == "witness"  # …and the witness's, apart
        assert truth in check["witness"]["text"]
        assert "the OCR witness read otherwise" in check["reason"]


@pytest.mark.slow
def test_the_real_ocr_witness_is_silent_when_it_agrees_with_the_vision_stage(engine: TextReader) -> None:
    answer = "The receipt is from “Blue Lotus Cafe”. The date is 2026-03-14. The total is 80.00."
    body = analyze(engine, rendered(EN_RECEIPT), EN_RECEIPT, (answer,), "Is this bill right?")
    arbitration = body["arbitration"]
    assert arbitration["status"] == "agreed"
    assert [check["verdict"] for check in arbitration["checks"]] == ["supported"] * 3
    assert all(check["witness"] is None for check in arbitration["checks"])
