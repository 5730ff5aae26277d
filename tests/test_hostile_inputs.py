"""A corpus of malformed and hostile inputs against every endpoint that reads an image (`/v1/analyze`,
`/v1/chat/completions`, `/infer`, `/caption`): each gets a 4xx with the right error `type`, never a 5xx; the odd
but valid images (16-bit, CMYK, many frames, polyglots that are images) are answered.

Files travel the way each endpoint takes them (a multipart part, or a `data:` URL in JSON); bodies, multipart
oddities and headers are sent as they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.settings import RateLimitSettings, Settings
from orchestrator.wiring import Backends
from tests.fakes import FakeReasoning, FakeVision
from tests.hostile_corpus import (
    BODIES,
    DEEP_NESTING,
    ENDPOINTS,
    FILES,
    JSON_ENDPOINTS,
    PNG,
    QUESTION,
    BodyCase,
    FileCase,
    chat_body,
    data_url,
)
from tests.hostile_multipart import (
    MULTIPART_ENDPOINTS,
    MULTIPARTS,
    Multipart,
    _part,
    _raw_multipart,
)

pytestmark = pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")  # Pillow, reading the garbage TIFF


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    backends = Backends(FakeVision(), FakeReasoning())
    unlimited = RateLimitSettings(requests_per_s=1e6, burst=10**6, max_concurrent=1000)
    with TestClient(create_app(Settings(rate_limit=unlimited), backends), raise_server_exceptions=False) as c:
        yield c


# --- files ----------------------------------------------------------------------------------------------------------


def send_file(client: TestClient, endpoint: str, data: bytes) -> Any:
    """`data` as the endpoint takes an image."""
    if endpoint == "/v1/analyze":
        return client.post(endpoint, files={"image": ("x.png", data, "image/png")}, data={"question": QUESTION})
    if endpoint == "/caption":
        return client.post(endpoint, files={"file": ("x.png", data, "image/png")})
    if endpoint == "/infer":
        return client.post(endpoint, json={"image_url": data_url(data), "prompt": QUESTION})
    return client.post(endpoint, json=chat_body(data_url(data)))


def assert_answered(response: Any, status: int, type_: str | None) -> None:
    assert response.status_code < 500, response.text
    assert response.status_code == status, response.text
    if type_ is None:
        return
    error = response.json()["error"]
    assert (error["type"], error["request_id"]) == (type_, response.headers["x-request-id"])
    assert error["message"]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("case", FILES, ids=[case.name for case in FILES])
def test_hostile_files(client: TestClient, case: FileCase, endpoint: str) -> None:
    assert_answered(send_file(client, endpoint, case.data()), case.status, case.type)


# --- JSON bodies ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", BODIES, ids=[f"{case.endpoint}:{case.name}" for case in BODIES])
def test_hostile_json_bodies(client: TestClient, case: BodyCase) -> None:
    response = client.post(case.endpoint, content=case.body, headers=case.headers)
    assert_answered(response, case.status, case.type)


@pytest.mark.parametrize("endpoint", JSON_ENDPOINTS)
def test_deeply_nested_json_is_invalid_json(client: TestClient, endpoint: str) -> None:
    body = f'{{"question": {DEEP_NESTING}}}'.encode()
    response = client.post(endpoint, content=body, headers={"content-type": "application/json"})
    assert_answered(response, 400, "invalid_json")


def test_a_body_over_the_request_limit_is_refused(client: TestClient) -> None:
    body = b'{"question": "' + b"x" * (31 * 1024 * 1024) + b'"}'
    for endpoint in JSON_ENDPOINTS:
        response = client.post(endpoint, content=body, headers={"content-type": "application/json"})
        assert_answered(response, 413, "request_too_large")


# --- multipart oddities ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", MULTIPART_ENDPOINTS)
@pytest.mark.parametrize("case", MULTIPARTS, ids=[case.name for case in MULTIPARTS])
def test_multipart_oddities(client: TestClient, case: Multipart, endpoint: str) -> None:
    assert_answered(client.post(endpoint, **case.build(endpoint)), case.status, case.type)


def test_analyze_form_field_oddities(client: TestClient) -> None:
    image = {"image": ("x.png", PNG, "image/png")}
    assert_answered(client.post("/v1/analyze", files=image), 422, "validation_error")  # no question
    assert_answered(
        client.post("/v1/analyze", files=image, data={"question": QUESTION, "stream": "maybe"}), 422, "validation_error"
    )
    assert_answered(client.post("/v1/analyze", files=image, data={"question": "x" * 5000}), 422, "validation_error")
    latin1 = _part("question", "Qu’est-ce que c’est ?".encode("cp1252")) + _part("image", PNG, "x.png")
    response = client.post("/v1/analyze", **_raw_multipart(latin1 + b"--b0undary--\r\n"))
    assert response.status_code == 200, response.text  # not UTF-8: read leniently, not refused


def test_the_corpus_is_large() -> None:
    distinct = len(FILES) + len({case.name for case in BODIES}) + len(MULTIPARTS)
    assert distinct >= 40
