"""Streaming: `Pipeline.stream`'s events, and `POST /v1/analyze` with `stream: true` as server-sent events.

The rule under test: a reasoning failure before the first delta falls back like `run`; after it, an error event names
the failure and the stream still ends properly, its answer replacing the incomplete streamed text."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from orchestrator.analysis.pipeline import Pipeline
from orchestrator.analysis.routing import KeywordRouter
from orchestrator.analysis.types import AnalyzeInput, ArbitrationEvent, DeltaEvent, DoneEvent, ErrorEvent, PipelineEvent
from orchestrator.api import schemas
from orchestrator.api.app import create_app
from orchestrator.api.schemas import AnalyzeResponse
from orchestrator.settings import Settings
from orchestrator.stage_settings import LocalReasoningSettings
from orchestrator.wiring import Backends
from reasoning_stage.errors import ReasoningUnavailable
from reasoning_stage.types import ChatMessage
from tests.fakes import FakeReasoning, FakeStreamingReasoning, FakeVision
from tests.images import decoded, png_bytes
from tests.servers import serving
from vision_stage.errors import VisionUnavailable

PNG = png_bytes()
VISION_ANSWER = "Text in the image most relevant to the question: “TOTAL 54.06”."
WHY = "Why is the total 54.06?"


def pipeline(vision: FakeVision | None = None, reasoning: FakeReasoning | None = None) -> Pipeline:
    return Pipeline(
        vision or FakeVision(), reasoning or FakeStreamingReasoning(), LocalReasoningSettings(), KeywordRouter()
    )


async def events_of(pipe: Pipeline, request: AnalyzeInput) -> list[PipelineEvent]:
    return [event async for event in pipe.stream(request)]


def kinds(events: list[PipelineEvent]) -> list[str]:
    return [type(event).__name__.removesuffix("Event") for event in events]


def done(events: list[PipelineEvent]) -> DoneEvent:
    last = events[-1]
    assert isinstance(last, DoneEvent)
    return last


def streamed_text(events: list[PipelineEvent]) -> str:
    return "".join(event.text for event in events if isinstance(event, DeltaEvent))


async def test_the_reasoning_answer_streams_word_by_word_and_ends_like_run() -> None:
    reasoning = FakeStreamingReasoning(answer="The total is 54.06 as printed.")
    events = await events_of(pipeline(reasoning=reasoning), AnalyzeInput(decoded(), WHY))
    assert kinds(events) == ["Route", "Vision", *["Delta"] * 6, "Arbitration", "Done"]
    assert streamed_text(events) == "The total is 54.06 as printed."
    outcome = done(events).outcome
    assert outcome.answer == "The total is 54.06 as printed."
    assert not done(events).replaced
    whole = FakeReasoning(answer="The total is 54.06 as printed.")
    ran = await pipeline(reasoning=whole).run(AnalyzeInput(decoded(), WHY))
    assert (ran.answer, ran.mode, ran.arbitration, ran.notices) == (
        outcome.answer, outcome.mode, outcome.arbitration, outcome.notices
    )  # fmt: skip
    assert outcome.timings_ms.keys() == ran.timings_ms.keys()


async def test_the_vision_only_route_and_a_backend_that_cannot_stream_yield_no_deltas() -> None:
    vision_only = await events_of(pipeline(), AnalyzeInput(decoded(), "What is the total?"))
    assert kinds(vision_only) == ["Route", "Vision", "Done"]
    assert done(vision_only).outcome.answer == VISION_ANSWER
    whole = await events_of(pipeline(reasoning=FakeReasoning()), AnalyzeInput(decoded(), WHY))
    assert kinds(whole) == ["Route", "Vision", "Arbitration", "Done"]
    assert done(whole).outcome.answer == "The total is 54.06."


async def test_a_failure_before_the_first_delta_falls_back_exactly_like_run() -> None:
    def broken() -> FakeStreamingReasoning:
        return FakeStreamingReasoning(error=ReasoningUnavailable("connection refused"))

    vision = FakeVision()
    request = AnalyzeInput(decoded(), "为什么这么贵？")
    events = await events_of(pipeline(vision, broken()), request)
    assert kinds(events) == ["Route", "Vision", "Done"]
    outcome, ran = done(events).outcome, await pipeline(reasoning=broken()).run(request)
    assert [r.task for r in vision.requests] == ["describe", "answer"]
    assert (outcome.answer, outcome.degraded, outcome.notices, outcome.failures) == (
        ran.answer, True, ran.notices, ran.failures
    )  # fmt: skip
    assert outcome.notices[0].startswith("推理服务不可用")
    assert not done(events).replaced


async def test_a_failure_after_deltas_is_an_error_event_then_a_degraded_done_that_replaces_the_text() -> None:
    reasoning = FakeStreamingReasoning(answer="The total is 54.06.", fail_after=2)
    vision = FakeVision()
    events = await events_of(pipeline(vision, reasoning), AnalyzeInput(decoded(), WHY))
    assert kinds(events) == ["Route", "Vision", "Delta", "Delta", "Error", "Done"]
    assert streamed_text(events) == "The total"
    error = events[4]
    assert isinstance(error, ErrorEvent)
    assert (error.failure.stage, error.failure.backend, error.failure.error_type) == (
        "reasoning", "fake", "ReasoningUnavailable"
    )  # fmt: skip
    last = done(events)
    assert last.replaced
    assert last.outcome.degraded
    assert last.outcome.answer == VISION_ANSWER
    assert last.outcome.failures == (error.failure,)
    assert last.outcome.notices == ("Reasoning unavailable (fake: ReasoningUnavailable); image description only.",)
    assert [r.task for r in vision.requests] == ["describe", "answer"]


async def test_a_corrected_answer_replaces_the_streamed_one() -> None:
    reasoning = FakeStreamingReasoning(script=("The total is 8.00.", "The total is 54.06."))
    events = await events_of(pipeline(reasoning=reasoning), AnalyzeInput(decoded(), "Is this bill reasonable?"))
    assert streamed_text(events) == "The total is 8.00."
    arbitration = events[-2]
    assert isinstance(arbitration, ArbitrationEvent)
    assert (arbitration.answer, arbitration.replaced, arbitration.arbitration.corrected) == (
        "The total is 54.06.", True, True
    )  # fmt: skip
    assert done(events).replaced
    assert done(events).outcome.answer == "The total is 54.06."


async def test_json_answers_are_not_replaced_by_their_compact_form() -> None:
    reasoning = FakeStreamingReasoning(answer='{"total": "54.06"}')
    request = AnalyzeInput(decoded(), "What is the total?", response_format="json")
    events = await events_of(pipeline(reasoning=reasoning), request)
    assert streamed_text(events) == '{"total": "54.06"}'
    assert done(events).outcome.answer_fields == {"total": "54.06"}
    assert not done(events).replaced


async def test_thinking_streams_apart_from_the_answer() -> None:
    reasoning = FakeStreamingReasoning(answer="Fine.", thinking="The total is plausible.")
    events = await events_of(pipeline(reasoning=reasoning), AnalyzeInput(decoded(), WHY))
    deltas = [event for event in events if isinstance(event, DeltaEvent)]
    assert deltas[0] == DeltaEvent(thinking="The total is plausible.")
    result = done(events).outcome.reasoning
    assert result is not None
    assert result.thinking == "The total is plausible."
    assert done(events).outcome.answer == "Fine."


async def test_closing_the_stream_early_closes_the_backends_stream() -> None:
    reasoning = FakeStreamingReasoning(answer="one two three four")
    stream = pipeline(reasoning=reasoning).stream(AnalyzeInput(decoded(), WHY))
    async for event in stream:
        if isinstance(event, DeltaEvent):
            break
    await stream.aclose()
    assert reasoning.abandoned == 1


async def test_history_and_sampling_options_reach_the_reasoning_stage() -> None:
    reasoning = FakeStreamingReasoning()
    history = (ChatMessage("user", "What is the total?"), ChatMessage("assistant", "54.06"))
    request = AnalyzeInput(decoded(), WHY, history=history, max_new_tokens=17, temperature=0.3)
    await pipeline(reasoning=reasoning).run(request)
    (sent,) = reasoning.requests
    assert [m.role for m in sent.messages] == ["system", "user", "assistant", "user"]
    assert sent.messages[1:3] == history
    assert sent.messages[-1].content.endswith(f"Question: {WHY}")
    assert (sent.max_new_tokens, sent.temperature) == (17, 0.3)


# --- /v1/analyze with stream: true ---


def event_models(client: TestClient) -> dict[str, type[BaseModel]]:
    """The analyze stream's events and the model of each one's data, as the app's OpenAPI description publishes them
    (`x-events`): streams are held to the published contract, not to a copy of it."""
    operation = client.get("/openapi.json").json()["paths"]["/v1/analyze"]["post"]
    events = operation["responses"]["200"]["content"]["text/event-stream"]["x-events"]
    return {name: getattr(schemas, ref["$ref"].removeprefix("#/components/schemas/")) for name, ref in events.items()}


def sse_events(client: TestClient, text: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, data) of each event, every data checked against the model docs/api.md and OpenAPI give it."""
    models = event_models(client)
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        assert set(fields) == {"event", "data"}, block
        data = json.loads(fields["data"])
        model = models[fields["event"]]
        assert set(data) == set(model.model_fields), fields["event"]
        model.model_validate(data)
        events.append((fields["event"], data))
    return events


def client_with(reasoning: FakeReasoning, vision: FakeVision | None = None) -> TestClient:
    return TestClient(
        create_app(Settings(), Backends(vision or FakeVision(), reasoning)), raise_server_exceptions=False
    )


def stream_json(client: TestClient, question: str = WHY, **fields: Any) -> Any:
    body = {"question": question, "image_base64": base64.b64encode(PNG).decode(), "stream": True, **fields}
    return client.post("/v1/analyze", json=body)


@pytest.fixture
def client() -> Iterator[TestClient]:
    with client_with(FakeStreamingReasoning(answer="The total is 54.06.")) as c:
        yield c


def test_analyze_streams_route_vision_deltas_arbitration_and_done(client: TestClient) -> None:
    response = stream_json(client)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(client, response.text)
    assert [name for name, _ in events] == ["route", "vision", *["reasoning"] * 4, "arbitration", "done"]
    assert events[0][1]["decision"] == "vision_then_reasoning"
    assert "".join(data["text"] for name, data in events if name == "reasoning") == "The total is 54.06."
    assert events[-2][1]["status"] == "agreed"
    final = events[-1][1]
    assert final["request_id"] == response.headers["x-request-id"]
    assert (final["answer"], final["replaced"], final["degraded"]) == ("The total is 54.06.", False, False)
    unstreamed = client.post("/v1/analyze", json={"question": WHY, "image_base64": base64.b64encode(PNG).decode()})
    assert set(unstreamed.json()) == set(AnalyzeResponse.model_fields)
    assert comparable(final) == comparable(unstreamed.json())


def comparable(body: dict[str, Any]) -> dict[str, Any]:
    """An analyze response without what differs between two runs of one request (ids, times)."""
    reasoning = {key: value for key, value in body["reasoning"].items() if key != "latency_ms"}
    ignored = ("replaced", "request_id", "session_id", "timings_ms")
    return {**{key: value for key, value in body.items() if key not in ignored}, "reasoning": reasoning}


def test_multipart_streaming_on_the_vision_only_route(client: TestClient) -> None:
    files = {"image": ("x.png", PNG, "image/png")}
    response = client.post("/v1/analyze", files=files, data={"question": "What is the total?", "stream": "true"})
    events = sse_events(client, response.text)
    assert [name for name, _ in events] == ["route", "vision", "done"]
    assert events[-1][1]["answer"] == VISION_ANSWER
    assert events[-1][1]["mode"] == "vision_only"


def test_a_mid_stream_failure_is_an_error_event_then_a_degraded_done() -> None:
    with client_with(FakeStreamingReasoning(answer="The total is 54.06.", fail_after=1)) as client:
        events = sse_events(client, stream_json(client).text)
    assert [name for name, _ in events] == ["route", "vision", "reasoning", "error", "done"]
    error = events[3][1]
    assert error["error"]["type"] == "reasoning_unavailable"
    assert "reasoning stage (backend fake)" in error["error"]["message"]
    assert error["failure"]["stage"] == "reasoning"
    final = events[-1][1]
    assert (final["degraded"], final["replaced"], final["answer"]) == (True, True, VISION_ANSWER)
    assert final["failures"][0]["error_type"] == "ReasoningUnavailable"


def test_a_failure_before_the_first_delta_streams_the_fallback_without_an_error() -> None:
    with client_with(FakeStreamingReasoning(error=ReasoningUnavailable("down"))) as client:
        events = sse_events(client, stream_json(client).text)
    assert [name for name, _ in events] == ["route", "vision", "done"]
    assert (events[-1][1]["degraded"], events[-1][1]["replaced"]) == (True, False)


def test_a_corrected_answer_says_it_replaced_the_streamed_text() -> None:
    with client_with(FakeStreamingReasoning(script=("The total is 8.00.", "The total is 54.06."))) as client:
        events = sse_events(client, stream_json(client, "Is this bill reasonable?").text)
    arbitration, final = events[-2][1], events[-1][1]
    assert (arbitration["status"], arbitration["answer"], arbitration["replaced"]) == (
        "corrected", "The total is 54.06.", True
    )  # fmt: skip
    assert (final["answer"], final["replaced"]) == ("The total is 54.06.", True)


def test_failures_before_the_stream_starts_keep_their_status_and_json_body() -> None:
    down = FakeVision(error=VisionUnavailable("ocr down", retry_after_s=7))
    with client_with(FakeStreamingReasoning(), vision=down) as client:
        response = stream_json(client)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "7"
        assert response.json()["error"]["type"] == "vision_unavailable"
        corrupt = {"image_base64": base64.b64encode(PNG[:60]).decode()}
        assert stream_json(client, **corrupt).json()["error"]["type"] == "image_corrupt"
        assert stream_json(client, stream="sometimes").status_code == 422


def test_events_reach_the_client_while_the_llm_is_still_writing() -> None:
    gate = threading.Event()
    reasoning = FakeStreamingReasoning(answer="The total is 54.06.", gate=gate)
    app = create_app(Settings(), Backends(FakeVision(), reasoning))
    body = {"question": WHY, "image_base64": base64.b64encode(PNG).decode(), "stream": True}
    seen: list[str] = []
    try:
        # A server that held the events back would wait for the gate, and the read would time out.
        with serving(app) as server, httpx.stream("POST", f"{server.url}/v1/analyze", json=body, timeout=5) as response:
            for line in response.iter_lines():
                if line.startswith("event: "):
                    seen.append(line.removeprefix("event: "))
                if seen[-1:] == ["reasoning"] and not gate.is_set():
                    assert seen == ["route", "vision", "reasoning"]  # the LLM is paused after its first word
                    gate.set()
    finally:
        gate.set()
    assert seen[-2:] == ["arbitration", "done"]
