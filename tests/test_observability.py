"""Metrics, JSON logs and the request id's journey to the remote stages."""

from __future__ import annotations

import json
import logging

import httpx
from prometheus_client import generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.observability.logs import JsonFormatter, accepted_request_id, request_id, stage_headers
from orchestrator.observability.metrics import Metrics, MetricsMiddleware, StateCollector
from orchestrator.observability.record import RequestRecord
from orchestrator.settings import Settings
from orchestrator.stages.breaker import BreakerState
from orchestrator.stages.endpoints import EndpointStatus
from orchestrator.wiring import Backends
from reasoning_stage.remote import RemoteReasoningBackend
from reasoning_stage.types import ChatMessage, ReasoningRequest
from tests.fakes import FakeReasoning, FakeVision
from tests.images import png_bytes
from tests.vllm_fake import vllm_stream


def scrape(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_a_finished_request_is_counted_by_its_record() -> None:
    metrics = Metrics()
    analysed = RequestRecord("a", "POST /v1/analyze", None, status=200)
    analysed.analysis = {
        "mode": "vision_then_reasoning",
        "profile": "general",
        "degraded": True,
        "failures": ["reasoning:remote:ReasoningUnavailable"],
        "vision": "ocr:rapidocr",
        "timings_ms": {"vision": 120.0, "route": 3.0},
        "arbitration": None,
        "vision_cached": True,
    }
    metrics.observe(analysed)
    metrics.observe(RequestRecord("b", "POST /v1/analyze", None, status=503, error_type="vision_unavailable"))
    text = scrape(metrics)
    assert (
        'orchestrator_requests_total{endpoint="POST /v1/analyze",mode="vision_then_reasoning",outcome="degraded",'
        'profile="general"} 1.0' in text
    )
    assert 'outcome="vision_unavailable"' in text
    assert 'orchestrator_degraded_total{stage="reasoning"} 1.0' in text
    assert 'orchestrator_stage_seconds_count{backend="ocr:rapidocr",stage="vision"} 1.0' in text
    assert 'orchestrator_vision_cache_total{result="hit"} 1.0' in text


def test_breaker_states_are_read_at_scrape_time() -> None:
    metrics = Metrics()
    states: dict[str, tuple[EndpointStatus, ...]] = {
        "vision": (EndpointStatus("http://a/v1", BreakerState.OPEN, 12.0, 0),)
    }
    metrics.registry.register(StateCollector(lambda: states))
    text = scrape(metrics)
    assert 'orchestrator_breaker_state{endpoint="http://a/v1",stage="vision",state="open"} 1.0' in text
    assert 'orchestrator_breaker_state{endpoint="http://a/v1",stage="vision",state="closed"} 0.0' in text
    states["vision"] = (EndpointStatus("http://a/v1", BreakerState.CLOSED, 0.0, 2),)
    text = scrape(metrics)
    assert 'orchestrator_breaker_state{endpoint="http://a/v1",stage="vision",state="closed"} 1.0' in text
    assert 'orchestrator_endpoint_in_flight{endpoint="http://a/v1",stage="vision"} 2.0' in text


def test_the_middleware_counts_api_requests_with_what_the_handler_noted() -> None:
    metrics = Metrics()

    async def answer(request: Request) -> Response:
        RequestRecord.of(request.scope).analysis.update(mode="vision_only", profile="medical")
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/v1/analyze", answer, methods=["POST"]), Route("/health", answer)])
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    with TestClient(app) as client:
        client.post("/v1/analyze")
        client.get("/health")
    text = scrape(metrics)
    assert 'mode="vision_only",outcome="ok",profile="medical"} 1.0' in text
    assert "/health" not in text
    assert "orchestrator_requests_in_flight 0.0" in text


def test_json_logs_carry_the_request_id() -> None:
    record = logging.LogRecord(
        "orchestrator.analysis.pipeline", logging.WARNING, __file__, 1, "stage %s failed", ("x",), None
    )
    token = request_id.set("req-42")
    try:
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id.reset(token)
    assert (line["level"], line["logger"], line["message"], line["request_id"]) == (
        "WARNING",
        "orchestrator.analysis.pipeline",
        "stage x failed",
        "req-42",
    )
    assert line["time"].endswith("Z")


def test_a_sane_incoming_request_id_is_kept_and_anything_else_replaced() -> None:
    assert accepted_request_id("abc-123_x.y:z") == "abc-123_x.y:z"
    for bad in (None, "", "a" * 129, "new\nline", "spa ce", "<script>"):
        replaced = accepted_request_id(bad)
        assert replaced != bad
        assert len(replaced) == 32


async def test_the_request_id_goes_to_the_remote_stage() -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("x-request-id"))
        answer = vllm_stream("m", ["fine"])
        return httpx.Response(answer.status, headers=answer.headers, content=answer.body)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        backend = await RemoteReasoningBackend.load(
            base_url="http://stage/v1", model="m", headers=stage_headers, http_client=http
        )
        token = request_id.set("req-7")
        try:
            result = await backend.generate(ReasoningRequest((ChatMessage("user", "hi"),)))
        finally:
            request_id.reset(token)
        await backend.generate(ReasoningRequest((ChatMessage("user", "hi"),)))
    assert result.text == "fine"
    assert seen == ["req-7", None]


def test_the_app_serves_metrics_and_keeps_a_sane_incoming_request_id() -> None:
    files = {"image": ("x.png", png_bytes(), "image/png")}
    with TestClient(create_app(Settings(), Backends(FakeVision(), FakeReasoning()))) as client:
        answered = client.post(
            "/v1/analyze", files=files, data={"question": "Why?", "profile": "legal"}, headers={"X-Request-ID": "t-1"}
        )
        refused = client.post("/v1/analyze", data={"question": "Why?"}, headers={"X-Request-ID": "bad id!"})
        text = client.get("/metrics").text
    assert answered.headers["x-request-id"] == "t-1"
    assert answered.json()["request_id"] == "t-1"
    assert refused.headers["x-request-id"] != "bad id!"
    assert (
        'orchestrator_requests_total{endpoint="POST /v1/analyze",mode="vision_then_reasoning",outcome="ok",'
        'profile="legal"} 1.0' in text
    )
    assert 'outcome="unsupported_media_type"' in text  # a form without a file is not multipart
    assert 'orchestrator_stage_seconds_count{backend="fake:fake-vision",stage="vision"} 1.0' in text
    assert 'orchestrator_arbitration_total{status="' in text
