"""The HTTP API over fake backends: status codes, error types, response shape."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.settings import LimitSettings, Settings
from orchestrator.wiring import Backends
from reasoning_stage.errors import ReasoningUnavailable
from tests.fakes import FakeReasoning, FakeVision
from tests.images import image_bytes, png_bytes
from vision_stage.errors import VisionUnavailable

PNG = png_bytes()


def make_client(vision: FakeVision | None = None, reasoning: FakeReasoning | None = None, **limits: int) -> TestClient:
    settings = Settings(limits=LimitSettings(**limits))
    backends = Backends(vision or FakeVision(), reasoning or FakeReasoning())
    return TestClient(create_app(settings, backends), raise_server_exceptions=False)


@pytest.fixture
def client() -> Iterator[TestClient]:
    with make_client() as c:
        yield c


def post_image(client: TestClient, data: bytes, question: str | None = "What is the total?", **fields: str) -> Any:
    form = dict(fields)
    if question is not None:
        form["question"] = question
    return client.post("/v1/analyze", files={"image": ("x.png", data, "image/png")}, data=form)


def assert_error(response: Any, status: int, type_: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == type_
    assert error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    return error


def test_multipart_answer_has_every_documented_field(client: TestClient) -> None:
    response = post_image(client, PNG)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {
        "request_id", "session_id", "answer", "answer_fields", "mode", "route", "vision", "reasoning", "arbitration",
        "confidence", "degraded", "notices", "disclaimer", "needs_human_review", "language", "failures", "timings_ms",
        "usage",
    }  # fmt: skip
    assert body["request_id"] == response.headers["x-request-id"]
    assert body["mode"] == "vision_only"
    assert body["route"]["decision"] == "vision_only"
    assert body["vision"]["backend"] == "fake"
    assert [line["text"] for line in body["vision"]["structured"]["text_lines"]][-1] == "TOTAL 54.06"
    assert body["vision"]["structured"]["facts"]["width"] == 64
    assert body["reasoning"] is None
    assert body["arbitration"]["status"] == "skipped"
    assert 0.0 < body["confidence"] <= 1.0
    assert body["usage"] == {
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
        "vision": {"calls": 1, "prompt_tokens": 0, "completion_tokens": 0},  # one look; the fake counts no tokens
        "reasoning": {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0},
    }


def test_reasoning_route_reports_the_llm_and_its_usage(client: TestClient) -> None:
    body = post_image(client, PNG, "Why is the total 54.06?").json()
    assert body["mode"] == "vision_then_reasoning"
    assert "why" in body["route"]["reason"]
    assert body["answer"] == "The total is 54.06."
    assert body["reasoning"]["model"] == "fake-llm"
    assert body["usage"]["completion_tokens"] == 4
    assert body["arbitration"]["status"] == "agreed"
    (check,) = body["arbitration"]["checks"]
    assert (check["kind"], check["value"], check["verdict"]) == ("number", "54.06", "supported")
    assert check["evidence"]["text"] == "TOTAL 54.06"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 4
    assert (body["usage"]["vision"]["calls"], body["usage"]["reasoning"]["calls"]) == (1, 1)


def test_json_with_base64_and_with_data_url(client: TestClient) -> None:
    encoded = base64.b64encode(PNG).decode()
    for payload in (
        {"image_base64": encoded},
        {"image_url": f"data:image/png;base64,{encoded}"},
        {"image_url": f"DATA:Image/PNG;BASE64,{encoded}"},  # scheme, type and encoding are case-insensitive
    ):
        response = client.post("/v1/analyze", json={"question": "What is the total?", "mode": "vision", **payload})
        assert response.status_code == 200, response.text
        assert response.json()["route"]["forced"] is True


def test_degraded_answer_when_the_llm_is_down() -> None:
    with make_client(reasoning=FakeReasoning(error=ReasoningUnavailable("down"))) as client:
        body = post_image(client, PNG, "为什么这么贵？").json()
    assert body["degraded"] is True
    assert body["notices"][0].startswith("推理服务不可用")
    assert body["failures"][0]["stage"] == "reasoning"
    assert body["language"] == "zh"


def test_vision_down_is_a_503_with_retry_after() -> None:
    with make_client(vision=FakeVision(error=VisionUnavailable("ocr down", retry_after_s=7))) as client:
        response = post_image(client, PNG)
    assert_error(response, 503, "vision_unavailable")
    assert response.headers["retry-after"] == "7"


@pytest.mark.parametrize(
    ("data", "status", "type_"),
    [
        (b"", 400, "image_empty"),
        (b"%PDF-1.4 this is not an image", 415, "image_unsupported"),
        (PNG[: len(PNG) // 2], 400, "image_corrupt"),
        (image_bytes("GIF")[:30], 400, "image_corrupt"),
    ],
)
def test_bad_uploads_get_a_precise_4xx(client: TestClient, data: bytes, status: int, type_: str) -> None:
    assert_error(post_image(client, data), status, type_)


def test_too_many_pixels_is_refused_before_decoding() -> None:
    with make_client(max_image_pixels=1_000_000) as client:
        error = assert_error(post_image(client, image_bytes("PNG", size=(1001, 1000))), 413, "image_too_many_pixels")
    assert "1001x1000" in error["message"]


def test_an_oversized_upload_is_refused() -> None:
    with make_client(max_image_bytes=1000) as client:
        error = assert_error(post_image(client, image_bytes("BMP", size=(100, 100))), 413, "image_too_large")
    assert "1000" in error["message"]


def test_a_body_over_the_request_limit_is_refused_before_it_is_read() -> None:
    with make_client(max_request_bytes=2000) as client:
        assert_error(post_image(client, b"x" * 5000), 413, "request_too_large")


@pytest.mark.parametrize(
    ("payload", "status", "type_"),
    [
        ({"image_base64": "bm90IGJhc2U2NA@@"}, 400, "invalid_base64"),
        ({"image_url": "data:text/plain;base64,aGk="}, 400, "invalid_data_url"),
        ({"image_url": "data:image/png,rawbytes"}, 400, "invalid_data_url"),
        ({"image_url": "https://127.0.0.1/a.png"}, 403, "image_url_forbidden"),
        ({"image_url": "ftp://example.com/a.png"}, 400, "image_url_not_supported"),
        ({}, 400, "image_missing"),
        ({"image_base64": "aGk=", "image_url": "data:image/png;base64,aGk="}, 400, "image_missing"),
        ({"image_base64": "aGk=", "colour": "red"}, 422, "validation_error"),
        ({"image_base64": "aGk=", "mode": "telepathy"}, 422, "validation_error"),
        ({"image_base64": base64.b64encode(PNG[:60]).decode()}, 400, "image_corrupt"),
    ],
)
def test_bad_json_requests_get_a_precise_4xx(
    client: TestClient, payload: dict[str, str], status: int, type_: str
) -> None:
    assert_error(client.post("/v1/analyze", json={"question": "What?", **payload}), status, type_)


def test_missing_or_blank_question_is_a_422(client: TestClient) -> None:
    error = assert_error(post_image(client, PNG, question=None), 422, "validation_error")
    assert "question" in error["message"]
    assert_error(post_image(client, PNG, question="   "), 422, "validation_error")
    encoded = base64.b64encode(PNG).decode()
    assert_error(client.post("/v1/analyze", json={"image_base64": encoded}), 422, "validation_error")


def test_form_and_body_shape_errors(client: TestClient) -> None:
    assert_error(post_image(client, PNG, colour="red"), 422, "validation_error")
    no_file = client.post("/v1/analyze", files={"question": (None, "What?"), "image": (None, "not a file")})
    assert_error(no_file, 400, "image_missing")
    assert_error(client.post("/v1/analyze", content=b"{not json", headers={"content-type": "application/json"}),
                 400, "invalid_json")  # fmt: skip
    assert_error(client.post("/v1/analyze", content=b"[1, 2]", headers={"content-type": "application/json"}),
                 422, "validation_error")  # fmt: skip
    assert_error(client.post("/v1/analyze", content=b"hello", headers={"content-type": "text/plain"}),
                 415, "unsupported_media_type")  # fmt: skip
    two_files = [("image", ("a.png", PNG, "image/png")), ("image", ("b.png", PNG, "image/png"))]
    assert_error(client.post("/v1/analyze", files=two_files, data={"question": "What?"}), 400, "invalid_multipart")


def test_unknown_paths_and_methods_get_json_errors(client: TestClient) -> None:
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/v1/analyze"), 405, "method_not_allowed")


def test_health_ready_and_not_ready() -> None:
    app = create_app(Settings(), Backends(FakeVision(), FakeReasoning()))
    cold = TestClient(app, raise_server_exceptions=False)  # lifespan not started: backends not loaded
    assert cold.get("/health").json() == {"status": "ok"}
    response = cold.get("/ready")
    assert_error(response, 503, "not_ready")
    assert response.headers["retry-after"] == "5"
    with TestClient(app) as warm:
        body = warm.get("/ready").json()
    assert body["ready"] is True
    assert body["vision"] == {"backend": "fake", "model": "fake-vision", "ok": True, "detail": "fake", "endpoints": []}


def test_ready_is_503_when_a_stage_is_unhealthy() -> None:
    with make_client(vision=FakeVision(healthy=False)) as client:
        response = client.get("/ready")
    assert response.status_code == 503
    assert response.json()["ready"] is False


def test_the_app_closes_its_backends_at_shutdown() -> None:
    vision, reasoning = FakeVision(), FakeReasoning()
    with make_client(vision, reasoning):
        assert not vision.closed
    assert vision.closed
    assert reasoning.closed


def test_openapi_describes_both_request_bodies(client: TestClient) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/v1/analyze"]["post"]
    assert set(operation["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert {"200", "400", "413", "415", "422", "503"} <= set(operation["responses"])


def refs(node: object) -> set[str]:
    """Every `$ref` in a JSON document."""
    if isinstance(node, dict):
        own = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return own.union(*(refs(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(refs(value) for value in node))
    return set()


def test_every_schema_the_openapi_description_refers_to_is_in_it(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    missing = {ref for ref in refs(schema) if ref.removeprefix("#/components/schemas/") not in components}
    assert not missing
    assert "AnalyzeJsonRequest" in components
    assert components["AnalyzeJsonRequest"]["additionalProperties"] is False


def test_openapi_describes_analyze_streaming(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    operation = schema["paths"]["/v1/analyze"]["post"]
    form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert form["stream"] == {"type": "boolean", "default": False}
    assert "stream" in schema["components"]["schemas"]["AnalyzeJsonRequest"]["properties"]
    ok = operation["responses"]["200"]["content"]
    assert ok["application/json"]["schema"] == {"$ref": "#/components/schemas/AnalyzeResponse"}
    events = ok["text/event-stream"]["x-events"]
    assert {name: ref["$ref"].rsplit("/", 1)[1] for name, ref in events.items()} == {
        "route": "RouteOut", "vision": "VisionOut", "reasoning": "ReasoningDeltaOut",
        "arbitration": "ArbitrationEventOut", "error": "StreamErrorOut", "done": "AnalyzeStreamDone",
    }  # fmt: skip
    assert "replaced" in schema["components"]["schemas"]["AnalyzeStreamDone"]["required"]


def test_openapi_describes_chat_completions_and_models(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    operation = schema["paths"]["/v1/chat/completions"]["post"]
    body = operation["requestBody"]["content"]
    assert body == {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}
    request = components["ChatCompletionRequest"]
    assert request["additionalProperties"] is False
    assert set(request["required"]) == {"model", "messages"}
    assert {"stream", "stream_options", "temperature", "max_tokens", "response_format"} <= set(request["properties"])
    responses = operation["responses"]
    for status in ("400", "404", "413", "415", "422", "502", "503"):
        assert responses[status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    ok = responses["200"]["content"]
    assert ok["application/json"]["schema"]["$ref"].endswith("/ChatCompletionOut")
    assert set(ok["text/event-stream"]["x-events"]) == {"chunk", "error"}
    assert "orchestration" in components["ChatCompletionOut"]["required"]
    assert "orchestration" in components["ChatCompletionChunkOut"]["properties"]
    models = schema["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert models["$ref"].endswith("/ModelListOut")
