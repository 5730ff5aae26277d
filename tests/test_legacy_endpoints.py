"""The original write-ups' endpoints: `POST /infer` (JSON `image_url` + `prompt`) and `POST /caption` (multipart
`file`), sent exactly as the write-ups sent them, over fake backends."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.settings import FetchSettings, LimitSettings, Settings
from orchestrator.wiring import Backends
from reasoning_stage.errors import ReasoningUnavailable
from tests.fakes import FakeReasoning, FakeVision
from tests.images import png_bytes
from vision_stage.errors import VisionUnavailable

PNG = png_bytes()
IMAGE = "data:image/png;base64," + base64.b64encode(PNG).decode()
WHY = "Why is the total 54.06?"


def make_client(
    vision: FakeVision | None = None, reasoning: FakeReasoning | None = None, settings: Settings | None = None
) -> TestClient:
    backends = Backends(vision or FakeVision(), reasoning or FakeReasoning())
    return TestClient(create_app(settings or Settings(), backends), raise_server_exceptions=False)


@pytest.fixture
def client() -> Iterator[TestClient]:
    with make_client() as c:
        yield c


def assert_error(response: Any, status: int, type_: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["type"], error["request_id"]) == (type_, response.headers["x-request-id"])
    assert error["message"]


# --- /infer ---------------------------------------------------------------------------------------------------------


def test_infer_answers_a_reasoning_prompt_through_the_llm() -> None:
    vision, reasoning = FakeVision(), FakeReasoning()
    with make_client(vision, reasoning) as client:
        response = client.post("/infer", json={"image_url": IMAGE, "prompt": WHY})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {
        "request_id", "answer", "confidence", "mode", "route", "degraded", "notices", "needs_human_review",
        "language", "timings_ms", "usage",
    }  # fmt: skip
    assert (body["answer"], body["mode"], body["degraded"]) == ("The total is 54.06.", "vision_then_reasoning", False)
    assert 0 < body["confidence"] <= 1
    assert body["route"]["forced"] is False  # mode `auto`: the router decided
    assert body["request_id"] == response.headers["x-request-id"]
    assert body["usage"]["completion_tokens"] == 4
    assert [request.task for request in vision.requests] == ["describe"]
    assert reasoning.requests[0].messages[-1].content.endswith(f"Question: {WHY}")


def test_infer_answers_a_perception_prompt_from_the_vision_stage(client: TestClient) -> None:
    body = client.post("/infer", json={"image_url": IMAGE, "prompt": "What is the total?"}).json()
    assert body["mode"] == "vision_only"
    assert body["answer"] == "Text in the image most relevant to the question: “TOTAL 54.06”."
    assert body["usage"]["total_tokens"] == 0


def test_infer_degrades_like_analyze_when_the_llm_is_down() -> None:
    with make_client(reasoning=FakeReasoning(error=ReasoningUnavailable("down"))) as client:
        body = client.post("/infer", json={"image_url": IMAGE, "prompt": "为什么这么贵？"}).json()
    assert body["degraded"] is True
    assert body["language"] == "zh"
    assert body["notices"][0].startswith("推理服务不可用")


@pytest.mark.parametrize(
    ("body", "status", "type_"),
    [
        ({"image_url": IMAGE}, 422, "validation_error"),
        ({"prompt": "What?"}, 422, "validation_error"),
        ({"image_url": IMAGE, "prompt": "   "}, 422, "validation_error"),
        ({"image_url": IMAGE, "prompt": "x" * 2001}, 422, "validation_error"),
        ({"image_url": IMAGE, "prompt": "What?", "mode": "vision"}, 422, "validation_error"),
        ({"image_url": 42, "prompt": "What?"}, 422, "validation_error"),
        ({"image_url": "data:image/png;base64,@@@", "prompt": "What?"}, 400, "invalid_base64"),
        ({"image_url": "data:text/plain;base64,aGk=", "prompt": "What?"}, 400, "invalid_data_url"),
        ({"image_url": "ftp://example.com/a.png", "prompt": "What?"}, 400, "image_url_not_supported"),
        ({"image_url": "http://127.0.0.1:9/a.png", "prompt": "What?"}, 403, "image_url_forbidden"),
        ({"image_url": "data:image/png;base64," + base64.b64encode(PNG[:60]).decode(), "prompt": "What?"}, 400,
         "image_corrupt"),
    ],
)  # fmt: skip
def test_infer_has_the_errors_of_analyze(client: TestClient, body: dict[str, object], status: int, type_: str) -> None:
    assert_error(client.post("/infer", json=body), status, type_)


def test_infer_refuses_http_urls_where_fetching_is_off() -> None:
    with make_client(settings=Settings(fetch=FetchSettings(enabled=False))) as client:
        response = client.post("/infer", json={"image_url": "https://example.com/a.png", "prompt": "What?"})
    assert_error(response, 400, "image_url_not_supported")


def test_infer_body_errors(client: TestClient) -> None:
    assert_error(client.post("/infer", content=b"{not json", headers={"content-type": "application/json"}),
                 400, "invalid_json")  # fmt: skip
    assert_error(client.post("/infer", data={"image_url": IMAGE, "prompt": "What?"}), 415, "unsupported_media_type")


def test_infer_with_the_vision_stage_down_is_a_503() -> None:
    with make_client(vision=FakeVision(error=VisionUnavailable("down", retry_after_s=3))) as client:
        response = client.post("/infer", json={"image_url": IMAGE, "prompt": "What?"})
    assert_error(response, 503, "vision_unavailable")
    assert response.headers["retry-after"] == "3"


# --- /caption -------------------------------------------------------------------------------------------------------


def test_caption_is_the_vision_stages_caption_task() -> None:
    vision, reasoning = FakeVision(), FakeReasoning()
    with make_client(vision, reasoning) as client:
        response = client.post("/caption", files={"file": ("receipt.png", PNG, "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["caption"] == "An image with 3 lines of text."
    assert body == {
        "request_id": response.headers["x-request-id"], "caption": body["caption"], "backend": "fake",
        "model": "fake-vision", "degraded": False, "latency_ms": 1.0,
    }  # fmt: skip
    assert [(request.task, request.question) for request in vision.requests] == [("caption", None)]
    assert reasoning.requests == []


def test_caption_takes_a_file_opened_as_the_write_ups_did(client: TestClient, tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(PNG)  # the name and the part's content type do not matter: the bytes are sniffed
    with path.open("rb") as file:
        response = client.post("/caption", files={"file": file})
    assert response.status_code == 200, response.text
    assert response.json()["caption"]


def test_caption_errors(client: TestClient) -> None:
    assert_error(client.post("/caption", files={"image": ("x.png", PNG)}), 422, "validation_error")
    assert_error(client.post("/caption", files={"file": (None, "not a file")}), 400, "image_missing")
    assert_error(client.post("/caption", files={"file": ("x.png", b"")}), 400, "image_empty")
    assert_error(client.post("/caption", files={"file": ("x.png", PNG[:40])}), 400, "image_corrupt")
    assert_error(client.post("/caption", files={"file": ("x.pdf", b"%PDF-1.4 ...")}), 415, "image_unsupported")
    two = [("file", ("a.png", PNG, "image/png")), ("file", ("b.png", PNG, "image/png"))]
    assert_error(client.post("/caption", files=two), 400, "invalid_multipart")
    assert_error(client.post("/caption", json={"file": IMAGE}), 415, "unsupported_media_type")


def test_caption_over_the_image_limit_is_a_413() -> None:
    with make_client(settings=Settings(limits=LimitSettings(max_image_bytes=100))) as client:
        assert_error(client.post("/caption", files={"file": ("x.png", PNG)}), 413, "image_too_large")


def test_caption_with_the_vision_stage_down_is_a_503() -> None:
    with make_client(vision=FakeVision(error=VisionUnavailable("down"))) as client:
        assert_error(client.post("/caption", files={"file": ("x.png", PNG)}), 503, "vision_unavailable")


# --- the OpenAPI description ----------------------------------------------------------------------------------------


def test_openapi_describes_infer_and_caption(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    infer = schema["paths"]["/infer"]["post"]
    assert infer["requestBody"]["content"] == {
        "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}}
    }
    request = components["InferRequest"]
    assert (set(request["required"]), request["additionalProperties"]) == ({"image_url", "prompt"}, False)
    ok = infer["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/InferResponse"}
    assert {"answer", "confidence"} <= set(components["InferResponse"]["required"])
    caption = schema["paths"]["/caption"]["post"]
    form = caption["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert (form["required"], form["properties"]["file"]) == (["file"], {"type": "string", "format": "binary"})
    assert caption["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/CaptionResponse")
    for operation in (infer, caption):
        for status in ("400", "413", "415", "422", "502", "503"):
            assert operation["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith(
                "/ErrorResponse"
            )
