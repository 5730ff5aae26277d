"""`response_format: "json"`: parsing the LLM's fields robustly (pure), checking them like any claim, and the API
field in JSON and multipart bodies."""

from __future__ import annotations

import base64
import json

import pytest
from fastapi.testclient import TestClient

from orchestrator.analysis.pipeline import Pipeline
from orchestrator.analysis.routing import KeywordRouter
from orchestrator.analysis.types import AnalyzeInput, AnalyzeOutcome
from orchestrator.api.app import create_app
from orchestrator.arbitration.answer_json import field_claims, parse_fields, serialise
from orchestrator.settings import Settings
from orchestrator.stage_settings import LocalReasoningSettings
from orchestrator.wiring import Backends
from tests.fakes import FakeReasoning, FakeVision
from tests.images import decoded, png_bytes

RIGHT = '{"merchant": "BLUE BOTTLE CAFE", "total": "54.06"}'


@pytest.mark.parametrize(
    "text",
    [
        RIGHT,
        f"```json\n{RIGHT}\n```",
        f"Here are the fields:\n{RIGHT}\nHope this helps.",
        '{"merchant": "BLUE BOTTLE CAFE", "total": "54.06",}',
        "{'merchant': 'BLUE BOTTLE CAFE', 'total': '54.06'}",
        'Sure {not json} — the fields: {"merchant": "BLUE BOTTLE CAFE", "total": "54.06"}',
        '```json\n{"merchant": "BLUE BOTTLE CAFE", "total": "54.06"',  # cut off by the token limit
    ],
)
def test_fields_are_parsed_from_fences_surrounding_text_and_trailing_commas(text: str) -> None:
    assert parse_fields(text) == {"merchant": "BLUE BOTTLE CAFE", "total": "54.06"}


def test_unparseable_answers_have_no_fields_and_nesting_is_flattened() -> None:
    assert parse_fields("The total is 54.06.") is None
    assert parse_fields('{"total": 54.06') == {"total": 54.06}  # cut off: repaired, what it said is kept
    assert parse_fields('["total", 54.06]') is None
    nested = parse_fields('{"total": 54.06, "meta": {"x": 1}, "items": [{"name": "Latte", "price": "18.00", "t": []}]}')
    assert nested == {"total": 54.06, "items": [{"name": "Latte", "price": "18.00"}]}
    assert serialise({"商户": "蓝瓶咖啡", "total": 54.06}) == '{"商户":"蓝瓶咖啡","total":54.06}'


def test_each_field_becomes_a_claim_with_a_referent() -> None:
    fields = parse_fields(
        '{"merchant": "BLUE BOTTLE CAFE", "total": "54.06", "items": [{"name": "Latte", "price": 18}]}'
    )
    assert fields is not None
    claims = [(c.kind, c.value, c.referent) for c in field_claims(fields, "en")]
    assert claims == [
        ("quote", "BLUE BOTTLE CAFE", ""),
        ("number", "54.06", "total"),
        ("quote", "Latte", ""),
        ("number", "18", "latte"),  # the line naming the item is the referent line
    ]


async def ask(reasoning: FakeReasoning, question: str = "Extract the receipt fields.") -> AnalyzeOutcome:
    pipeline = Pipeline(FakeVision(), reasoning, LocalReasoningSettings(), KeywordRouter())
    return await pipeline.run(AnalyzeInput(decoded(), question, mode="vision", response_format="json"))


async def test_json_fields_the_image_shows_are_agreed_and_take_the_reasoning_route() -> None:
    reasoning = FakeReasoning(answer=f"```json\n{RIGHT}\n```")
    outcome = await ask(reasoning)
    assert outcome.mode == "vision_then_reasoning"  # even though the client asked for vision
    assert "response_format json" in outcome.route.reason
    assert outcome.answer == '{"merchant":"BLUE BOTTLE CAFE","total":"54.06"}'
    assert outcome.answer_fields == {"merchant": "BLUE BOTTLE CAFE", "total": "54.06"}
    assert outcome.arbitration is not None
    assert outcome.arbitration.status == "agreed"
    assert [check.verdict for check in outcome.arbitration.checks] == ["supported", "supported"]
    assert "JSON" in reasoning.requests[0].messages[0].content


async def test_a_wrong_total_is_re_asked_and_the_corrected_json_returned() -> None:
    reasoning = FakeReasoning(script=('{"merchant": "BLUE BOTTLE CAFE", "total": "45.06"}', RIGHT))
    outcome = await ask(reasoning)
    assert outcome.arbitration is not None
    assert (outcome.arbitration.status, outcome.arbitration.corrected) == ("corrected", True)
    assert outcome.answer_fields == {"merchant": "BLUE BOTTLE CAFE", "total": "54.06"}
    assert "54.06" in reasoning.requests[1].messages[-1].content


@pytest.mark.parametrize(
    ("question", "expected"), [("Extract the fields.", "not valid JSON"), ("提取字段。", "不是有效的JSON")]
)
async def test_an_answer_that_is_not_json_is_returned_as_written_for_review(question: str, expected: str) -> None:
    outcome = await ask(FakeReasoning(answer="The total is 54.06."), question)
    assert outcome.answer == "The total is 54.06."
    assert outcome.answer_fields is None
    assert any(expected in text for text in outcome.notices)
    assert outcome.needs_human_review


@pytest.fixture
def client() -> TestClient:
    backends = Backends(FakeVision(), FakeReasoning(answer=RIGHT))
    return TestClient(create_app(Settings(), backends), raise_server_exceptions=False)


def test_the_api_accepts_response_format_in_json_and_multipart(client: TestClient) -> None:
    encoded = base64.b64encode(png_bytes()).decode()
    with client:
        by_json = client.post(
            "/v1/analyze", json={"question": "Fields?", "image_base64": encoded, "response_format": "json"}
        )
        by_form = client.post(
            "/v1/analyze",
            files={"image": ("x.png", png_bytes(), "image/png")},
            data={"question": "Fields?", "response_format": "json"},
        )
        text = client.post("/v1/analyze", json={"question": "What is the total?", "image_base64": encoded})
    for response in (by_json, by_form):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["answer_fields"] == {"merchant": "BLUE BOTTLE CAFE", "total": "54.06"}
        assert json.loads(body["answer"]) == body["answer_fields"]
        assert body["mode"] == "vision_then_reasoning"
    assert text.json()["answer_fields"] is None


def test_the_api_rejects_other_response_formats(client: TestClient) -> None:
    encoded = base64.b64encode(png_bytes()).decode()
    with client:
        by_json = client.post("/v1/analyze", json={"question": "Q?", "image_base64": encoded, "response_format": "xml"})
        by_form = client.post(
            "/v1/analyze",
            files={"image": ("x.png", png_bytes(), "image/png")},
            data={"question": "Q?", "response_format": "yaml"},
        )
    for response in (by_json, by_form):
        assert response.status_code == 422, response.text
        assert response.json()["error"]["type"] == "validation_error"
