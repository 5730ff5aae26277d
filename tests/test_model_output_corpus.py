"""A corpus of what vision models really write for the describe task (`tests/recorded/model_outputs.jsonl`: JSON in
every reasonable shape, Markdown, prose, fences, thinking and box variants, Chinese and English), read two ways: by
the parser directly, and by the orchestrator with its vision stage `remote` over a vLLM-format server on loopback.
Every one must give a 200 whose vision description still holds what the model read, with the values the arbiter
checks against as structured evidence, and no thinking in it."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.settings import ArbitrationSettings, CacheSettings, RateLimitSettings, RouterSettings, Settings
from orchestrator.stage_settings import RemoteReasoningSettings, RemoteVisionSettings
from tests.images import png_bytes
from tests.servers import serving
from tests.vllm_fake import FakeVllm, vllm_stream
from vision_stage.parsing import read_output
from vision_stage.types import ImageFacts, StructuredDescription

CORPUS = Path(__file__).resolve().parent / "recorded" / "model_outputs.jsonl"
CASES: list[dict[str, Any]] = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines()]
FACTS = ImageFacts(600, 800, "portrait", "PNG", ())
VISION_MODEL, LLM_MODEL = "zai-org/GLM-4.6V-Flash", "zai-org/GLM-4-9B-0414"


def evidence(structured: StructuredDescription) -> str:
    """What the arbiter can cite: the fields and the lines of text, one per line."""
    fields = [f"{kv.key}: {kv.value}" for kv in structured.fields]
    return "\n".join(fields + [line.text for line in structured.text_lines] + [o.label for o in structured.objects])


def test_the_corpus_is_large_and_varied() -> None:
    assert len(CASES) >= 40
    assert len({case["id"] for case in CASES}) == len(CASES)
    assert sum(case["lang"] == "zh" for case in CASES) >= 5
    kinds = {case["id"].split("-")[0] for case in CASES}
    assert {"json", "md", "prose", "zh", "think", "markers", "boxed"} <= kinds


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_the_parser_keeps_what_the_model_read(case: dict[str, Any]) -> None:
    reading = read_output("describe", case["text"], FACTS, who="the model")
    for value in case["holds"]:
        assert value in reading.description, f"{value!r} lost from the description"
    found = evidence(reading.structured)
    for value in case["evidence"]:
        assert value in found, f"{value!r} is not structured evidence: {found!r}"
    for value in case["absent"]:
        assert value not in reading.description
    if case["boxes"] is not None:
        assert len(reading.boxes) == case["boxes"]


@pytest.fixture(scope="module")
def service() -> Iterator[tuple[TestClient, FakeVllm, FakeVllm]]:
    vision, reasoning = FakeVllm(VISION_MODEL), FakeVllm(LLM_MODEL)
    with serving(vision.app()) as vision_server, serving(reasoning.app()) as reasoning_server:
        settings = Settings(
            vision=RemoteVisionSettings(base_url=vision_server.base_url, model=VISION_MODEL),
            reasoning=RemoteReasoningSettings(base_url=reasoning_server.base_url, model=LLM_MODEL),
            router=RouterSettings(kind="keyword"),
            arbitration=ArbitrationSettings(probes="off"),
            cache=CacheSettings(enabled=False),
            rate_limit=RateLimitSettings(requests_per_s=1000.0, burst=1000),  # the corpus runs back to back
        )
        with TestClient(create_app(settings)) as client:
            yield client, vision, reasoning


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_the_service_answers_200_with_what_the_model_read(
    service: tuple[TestClient, FakeVllm, FakeVllm], case: dict[str, Any]
) -> None:
    client, vision, reasoning = service
    vision.replies = [vllm_stream(VISION_MODEL, _pieces(case["text"]))]
    reasoning.replies = [vllm_stream(LLM_MODEL, ["The total is 80.00."])]
    image = base64.b64encode(png_bytes((120, 160))).decode()
    response = client.post(
        "/v1/analyze", json={"image_base64": image, "question": "What is the total?", "mode": "reasoning"}
    )

    assert response.status_code == 200, response.text
    body = response.json()
    description = body["vision"]["description"]
    for value in case["holds"]:
        assert value in description
    for value in case["absent"]:
        assert value not in description
    assert body["reasoning"] is not None, "the reasoning stage got the description"
    assert not body["degraded"]
    assert reasoning.requests[-1]["messages"][-1]["content"].count(case["holds"][0]) >= 1


def _pieces(text: str, size: int = 7) -> list[str]:
    """The text in small deltas, as a server streams it (split mid-token and mid-tag)."""
    return [text[i : i + size] for i in range(0, len(text), size)]
