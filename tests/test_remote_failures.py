"""The `remote` backends' failures (every error becomes the stage's, naming the backend, URL and model), health,
closing and loading, through `httpx.MockTransport` and over real HTTP on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from reasoning_stage.errors import ReasoningInvalidOutput, ReasoningRejected, ReasoningUnavailable
from reasoning_stage.remote import RemoteReasoningBackend
from reasoning_stage.types import ReasoningRequest
from tests.remote_backends import (
    BASE_URL,
    CHAT,
    LLM_MODEL,
    VISION_MODEL,
    answer_request,
    ask,
    look,
)
from tests.servers import serving, unused_port
from tests.vllm_fake import FakeVllm, Recorded, recorded, vllm_stream
from vision_stage.errors import VisionInvalidOutput, VisionRejected, VisionUnavailable
from vision_stage.remote import RemoteVisionBackend

# --- failures, both stages --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    model: str
    run: Callable[[FakeVllm], Awaitable[object]]
    errors: dict[str, type[Exception]]


async def _run_vision(fake: FakeVllm) -> object:
    return await look(fake, answer_request())


STAGES = {
    "vision": Stage(
        VISION_MODEL,
        _run_vision,
        {"unavailable": VisionUnavailable, "rejected": VisionRejected, "invalid": VisionInvalidOutput},
    ),
    "reasoning": Stage(
        LLM_MODEL,
        ask,
        {"unavailable": ReasoningUnavailable, "rejected": ReasoningRejected, "invalid": ReasoningInvalidOutput},
    ),
}
NO_CHOICES = (
    '"choices":[{"index":0,"delta":{"content":" is 54.06."},"logprobs":null,"finish_reason":null,"token_ids":null}]',
    '"delta":{"content":" is 54.06."}',
)
EVENT_STREAM = {"content-type": "text/event-stream; charset=utf-8"}
FAILURES = [
    pytest.param(lambda: recorded("cut_stream"), "invalid", "cut off", id="cut-stream"),
    pytest.param(lambda: recorded("empty_stream"), "invalid", "empty stream", id="empty-stream"),
    pytest.param(lambda: recorded("not_json_event"), "invalid", "malformed stream", id="event-not-json"),
    pytest.param(lambda: recorded("chat_completion_json"), "invalid", "application/json", id="wrong-content-type"),
    pytest.param(lambda: Recorded(200, EVENT_STREAM, b"data: \xff\n\n"), "invalid", "malformed", id="not-utf8"),
    pytest.param(
        lambda: recorded("glm4_answer_no_usage").replaced(*NO_CHOICES),
        "invalid",
        "without choices",
        id="chunk-without-choices",
    ),
    pytest.param(lambda: recorded("stream_error_event"), "unavailable", "engine is dead", id="error-event"),
    pytest.param(lambda: recorded("error_429"), "unavailable", "HTTP 429: Too many requests", id="429"),
    pytest.param(lambda: recorded("error_503"), "unavailable", "HTTP 503: no healthy upstream", id="503"),
    pytest.param(lambda: recorded("error_400"), "rejected", "HTTP 400: This model's maximum context", id="400"),
    pytest.param(lambda: recorded("error_404"), "rejected", "HTTP 404: The model `glm-4.6v` does not", id="404"),
    pytest.param(
        lambda: httpx.ConnectError("[Errno 111] Connection refused"), "unavailable", "ConnectError", id="conn"
    ),
    pytest.param(lambda: httpx.ReadTimeout("timed out"), "unavailable", "did not answer in time", id="timeout"),
    pytest.param(
        lambda: vllm_stream(LLM_MODEL, ["I cannot"], "content_filter"), "rejected", "content_filter", id="filtered"
    ),
    pytest.param(lambda: vllm_stream(LLM_MODEL, ["The"], "abort"), "unavailable", "gave up", id="aborted"),
    pytest.param(lambda: vllm_stream(LLM_MODEL, ["x"], "tool_calls"), "invalid", "'tool_calls'", id="tool-calls"),
]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize(("reply", "kind", "says"), FAILURES)
async def test_failures_become_the_stage_errors_naming_backend_url_and_model(
    stage: str, reply: Callable[[], Recorded | Exception], kind: str, says: str
) -> None:
    spec = STAGES[stage]
    with pytest.raises(spec.errors[kind]) as raised:
        await spec.run(FakeVllm(spec.model, [reply()]))

    message = str(raised.value)
    assert type(raised.value) is spec.errors[kind]
    assert f"remote {stage} backend ({BASE_URL}, model {spec.model!r})" in message
    assert says in message
    assert getattr(raised.value, "retry_after_s", None) == (7.0 if says.startswith("HTTP 429") else None)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("status", [400, 401, 403, 404, 408, 409, 413, 422, 429, 500, 502, 503, 504])
async def test_every_http_error_status_maps_to_rejected_or_unavailable(stage: str, status: int) -> None:
    spec = STAGES[stage]
    body = f'{{"error":{{"message":"status {status}","type":"Error","param":null,"code":{status}}}}}'.encode()
    reply = Recorded(status, {"content-type": "application/json"}, body)
    kind = "unavailable" if status in (408, 429) or status >= 500 else "rejected"
    with pytest.raises(spec.errors[kind], match=f"HTTP {status}: status {status}"):
        await spec.run(FakeVllm(spec.model, [reply]))


def _in_30_s() -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize(
    ("header", "low", "high"),
    [("120", 120.0, 120.0), ("0.5", 0.5, 0.5), (None, 28.0, 31.0), ("-3", 0.0, 0.0), ("soon", None, None)],
    ids=["seconds", "fraction", "http-date", "negative", "unreadable"],
)
async def test_retry_after_is_read_as_seconds_or_an_http_date(
    stage: str, header: str | None, low: float | None, high: float | None
) -> None:
    spec = STAGES[stage]
    reply = recorded("error_503").with_headers(retry_after=header or _in_30_s())
    with pytest.raises(spec.errors["unavailable"]) as raised:
        await spec.run(FakeVllm(spec.model, [reply]))
    retry_after = getattr(raised.value, "retry_after_s", None)
    if low is None or high is None:
        assert retry_after is None
    else:
        assert retry_after is not None
        assert low <= retry_after <= high


# --- health, closing, loading -----------------------------------------------------------------------------------------


async def test_health_lists_the_models_and_says_when_ours_is_missing() -> None:
    vision_fake = FakeVllm(VISION_MODEL, models=recorded("models_glm46v"))
    vision = await RemoteVisionBackend.load(base_url=BASE_URL, model=VISION_MODEL, http_client=vision_fake.client())
    reasoning_fake = FakeVllm(LLM_MODEL, models=recorded("models_glm46v"))
    reasoning = await RemoteReasoningBackend.load(
        base_url=BASE_URL, model=LLM_MODEL, http_client=reasoning_fake.client()
    )

    ok, wrong = await vision.health(), await reasoning.health()
    assert ok.ok
    assert VISION_MODEL in ok.detail
    assert not wrong.ok
    assert f"serves only: {VISION_MODEL}" in wrong.detail


@pytest.mark.parametrize(
    ("models", "says"),
    [
        (lambda: httpx.ConnectError("[Errno 111] Connection refused"), "Unavailable"),
        (lambda: recorded("error_404"), "Rejected"),
        (lambda: recorded("not_json_event"), ""),
    ],
    ids=["down", "no-models-route", "not-json"],
)
async def test_health_never_raises(models: Callable[[], Recorded | Exception], says: str) -> None:
    vision_fake = FakeVllm(VISION_MODEL, models=models())
    vision = await RemoteVisionBackend.load(base_url=BASE_URL, model=VISION_MODEL, http_client=vision_fake.client())
    reasoning_fake = FakeVllm(LLM_MODEL, models=models())
    reasoning = await RemoteReasoningBackend.load(
        base_url=BASE_URL, model=LLM_MODEL, http_client=reasoning_fake.client()
    )

    for health in (await vision.health(), await reasoning.health()):
        assert not health.ok
        assert says in health.detail


async def test_credentials_in_the_base_url_stay_out_of_messages_and_health() -> None:
    fake = FakeVllm(VISION_MODEL, models=httpx.ConnectError("[Errno 111] Connection refused"))
    keyed = BASE_URL.replace("http://", "http://user:s3cret@")
    backend = await RemoteVisionBackend.load(base_url=keyed, model=VISION_MODEL, http_client=fake.client())
    health = await backend.health()
    assert not health.ok
    assert backend.base_url == BASE_URL
    assert "s3cret" not in health.detail
    assert f"({BASE_URL}, model" in health.detail


async def test_aclose_leaves_an_injected_client_open_and_refuses_new_work() -> None:
    client = FakeVllm(LLM_MODEL).client()
    reasoning = await RemoteReasoningBackend.load(base_url=BASE_URL, model=LLM_MODEL, http_client=client)
    vision = await RemoteVisionBackend.load(base_url=BASE_URL, model=VISION_MODEL, http_client=client)
    await reasoning.aclose()
    await vision.aclose()

    assert not client.is_closed
    with pytest.raises(ReasoningUnavailable, match="closed"):
        await reasoning.generate(ReasoningRequest(CHAT))
    with pytest.raises(VisionUnavailable, match="closed"):
        await vision.generate(answer_request())
    assert (await reasoning.health()).detail == "closed"
    assert (await vision.health()).detail == "closed"
    await client.aclose()


@pytest.mark.parametrize("base_url", ["127.0.0.1:8000/v1", "ftp://vllm.test/v1", ""])
async def test_load_refuses_a_base_url_that_is_not_http(base_url: str) -> None:
    with pytest.raises(ValueError, match="http"):
        await RemoteVisionBackend.load(base_url=base_url, model=VISION_MODEL)
    with pytest.raises(ValueError, match="http"):
        await RemoteReasoningBackend.load(base_url=base_url, model=LLM_MODEL)


# --- real HTTP on loopback --------------------------------------------------------------------------------------------


async def test_over_loopback_http_both_backends_stream_errors_and_health() -> None:
    fake = FakeVllm(LLM_MODEL, [recorded("error_429"), recorded("glm4_answer_reasoning")], recorded("models_glm_z1"))
    vision_fake = FakeVllm(VISION_MODEL, [recorded("glm46v_describe")])
    with serving(fake.app()) as server, serving(vision_fake.app()) as vision_server:
        reasoning = await RemoteReasoningBackend.load(base_url=server.base_url, model=LLM_MODEL, timeout_s=10)
        vision = await RemoteVisionBackend.load(base_url=vision_server.base_url, model=VISION_MODEL, timeout_s=10)
        try:
            assert (await reasoning.health()).ok
            with pytest.raises(ReasoningUnavailable, match="HTTP 429") as raised:
                await reasoning.generate(ReasoningRequest(CHAT))
            assert raised.value.retry_after_s == 7.0
            result = await reasoning.generate(ReasoningRequest(CHAT))
            described = await vision.generate(answer_request("describe"))
        finally:
            await reasoning.aclose()
            await vision.aclose()

    assert (result.prompt_tokens, result.completion_tokens, result.finish_reason) == (412, 96, "stop")
    assert result.text.startswith("Yes.")
    assert result.thinking is not None
    assert [line.text for line in described.structured.text_lines][-1] == "TOTAL 54.06"
    assert len(fake.requests) == 2
    assert len(vision_fake.requests) == 1


async def test_over_loopback_a_closed_port_is_unavailable() -> None:
    port = unused_port()
    backend = await RemoteReasoningBackend.load(base_url=f"http://127.0.0.1:{port}/v1", model=LLM_MODEL, timeout_s=5)
    try:
        with pytest.raises(ReasoningUnavailable, match="could not be reached"):
            await backend.generate(ReasoningRequest(CHAT))
        assert not (await backend.health()).ok
    finally:
        await backend.aclose()
