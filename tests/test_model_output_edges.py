"""Edges of reading model output where a reading was lost, crashed or leaked thinking: each case once went wrong."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.arbitration.answer_json import parse_fields
from orchestrator.settings import ArbitrationSettings, CacheSettings, RouterSettings, Settings
from orchestrator.stage_settings import RemoteReasoningSettings, RemoteVisionSettings
from reasoning_stage.remote import RemoteReasoningBackend
from reasoning_stage.types import ChatMessage, ReasoningRequest
from stage_protocol.client.errors import StageStatus
from stage_protocol.client.failures import classify
from tests.images import decoded, png_bytes
from tests.servers import serving
from tests.vllm_fake import FakeVllm, vllm_stream
from vision_stage.boxes import box_of
from vision_stage.description import NOT_JSON_NOTE, REMARKS_HEADER, read_description
from vision_stage.errors import VisionInvalidOutput
from vision_stage.parsing import read_output
from vision_stage.remote import RemoteVisionBackend
from vision_stage.server import content_of
from vision_stage.types import DetectedObject, ImageFacts, KeyValue, VisionRequest

FACTS = ImageFacts(640, 480, "landscape", "PNG", ())


@pytest.mark.parametrize("text", ["2024-03-01 12:30", "Tel: 021-5555-1234 ext 12", "reads 10:10 on 2024-05-06"])
def test_text_holding_four_numbers_is_not_a_box(text: str) -> None:
    assert box_of(text) is None
    assert box_of([text, "x"]) is None


def test_a_line_holding_a_date_is_kept_as_a_line() -> None:
    read = read_description(json.dumps({"text_lines": ["2024-03-01 12:30", "Thank you!"]}), FACTS)
    assert [line.text for line in read.structured.text_lines] == ["2024-03-01 12:30", "Thank you!"]
    read = read_description(json.dumps({"objects": {"clock": "reads 10:10 on 2024-05-06"}}), FACTS)
    assert read.structured.objects == (DetectedObject("clock (reads 10:10 on 2024-05-06)"),)


def test_an_integer_past_python_s_digit_limit_does_not_crash_the_readers() -> None:
    text = '{"caption": "a barcode", "n": ' + "9" * 4400 + "}"
    assert "a barcode" in read_output("describe", text, FACTS, who="m").description
    assert parse_fields(text) is not None


@pytest.mark.parametrize(
    "text", ["A receipt from [BLUE BOTTLE CAFE] dated 2024-03-01. Total: 80.00", "See [the total](#total): 80.00"]
)
def test_prose_with_brackets_stays_prose(text: str) -> None:
    read = read_description(text, FACTS)
    assert read.notes == (NOT_JSON_NOTE,)
    assert text in read.description


def test_a_json_answer_whose_only_braces_are_prose_has_no_fields() -> None:
    assert parse_fields("Total: 54.06 (see {note: blurry})") is None


def test_attributes_of_objects_and_fields_are_kept() -> None:
    text = json.dumps(
        {
            "objects": [{"label": "cup", "position": "top left"}, {"label": "person", "type": "adult man"}],
            "fields": [{"key": "Total", "value": "80.00", "currency": "CNY"}],
        }
    )
    read = read_description(text, FACTS)
    assert read.structured.objects == (
        DetectedObject("cup (position: top left)"),
        DetectedObject("person (type: adult man)"),
    )
    assert read.structured.fields == (KeyValue("Total", "80.00 (currency: CNY)"),)


def test_what_the_model_wrote_around_its_json_crosses_the_stage_server() -> None:
    text = '{"caption": "A receipt"}\nNote: the bottom is cut off; the total looks like 80.00.'
    result = read_output("describe", text, FACTS, who="m").result("glm", "m", "describe", started=0.0)
    sent = content_of("describe", result)
    again = read_output("describe", sent, FACTS, who="m")
    assert REMARKS_HEADER in again.description
    assert "the total looks like 80.00" in again.description


@pytest.mark.parametrize(
    ("code", "retryable"), [("1110", False), ("1112", False), ("1308", False), ("1310", False), ("1302", True)]
)
def test_the_vendor_s_account_and_plan_codes_are_not_retried(code: str, retryable: bool) -> None:
    failure = classify(StageStatus(429, {"code": code, "message": "…"}, {}))
    assert (failure.kind, failure.retryable) == ("unavailable", retryable)


# --- thinking and answer tags in a stream -----------------------------------------------------------------------------

LLM = "zai-org/GLM-Z1-9B-0414"
PIECES = ["Compare the", " two lines", ".</th", "ink>\n<ans", "wer>The total", " is 80.00.</an", "swer>"]


async def test_answer_tags_split_across_chunks_never_reach_the_streamed_text() -> None:
    fake = FakeVllm(LLM, [vllm_stream(LLM, PIECES)])
    backend = await RemoteReasoningBackend.load(base_url="http://llm.test/v1", model=LLM, http_client=fake.client())
    chat = (ChatMessage("user", "What is the total?"),)
    streamed = "".join([delta.text async for delta in backend.stream(ReasoningRequest(chat))])
    await backend.aclose()
    assert "<answer>" not in streamed
    assert "</answer>" not in streamed
    assert streamed.endswith("The total is 80.00.")


@pytest.fixture
def service() -> Iterator[tuple[TestClient, FakeVllm, FakeVllm]]:
    vision, reasoning = FakeVllm("vlm"), FakeVllm(LLM)
    with serving(vision.app()) as vision_server, serving(reasoning.app()) as reasoning_server:
        settings = Settings(
            vision=RemoteVisionSettings(base_url=vision_server.base_url, model="vlm"),
            reasoning=RemoteReasoningSettings(base_url=reasoning_server.base_url, model=LLM),
            router=RouterSettings(kind="keyword"),
            arbitration=ArbitrationSettings(probes="off"),
            cache=CacheSettings(enabled=False),
        )
        with TestClient(create_app(settings)) as client:
            yield client, vision, reasoning


def test_a_streamed_answer_s_final_text_has_no_thinking_and_no_answer_tags(
    service: tuple[TestClient, FakeVllm, FakeVllm],
) -> None:
    client, vision, reasoning = service
    vision.replies = [vllm_stream("vlm", ['{"caption": "receipt", "fields": {"Total": "80.00"}}'])]
    reasoning.replies = [vllm_stream(LLM, PIECES)]
    image = base64.b64encode(png_bytes()).decode()
    body = {"image_base64": image, "question": "Why is the total 80.00?", "mode": "reasoning", "stream": True}
    response = client.post("/v1/analyze", json=body)
    blocks = [block for block in response.text.split("\n\n") if block.startswith("event: done")]
    done: dict[str, Any] = json.loads(blocks[-1].split("data: ", 1)[1])
    assert done["reasoning"]["answer"] == "The total is 80.00."
    assert "Compare the two lines." in done["reasoning"]["thinking"]


@pytest.mark.parametrize("content", ["<think>The total might be 80, maybe 90</think>", "Maybe 80, maybe 90.</think>"])
async def test_thinking_the_model_marked_never_becomes_the_answer(content: str) -> None:
    fake = FakeVllm("vlm", [vllm_stream("vlm", [content])])
    backend = await RemoteVisionBackend.load(base_url="http://vlm.test/v1", model="vlm", http_client=fake.client())
    with pytest.raises(VisionInvalidOutput, match="gave no answer"):
        await backend.generate(VisionRequest(decoded(), "What is the total?", task="answer"))
    await backend.aclose()
