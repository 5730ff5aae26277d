"""The `remote` backends against recorded vLLM responses (`tests/recorded/`): through `httpx.MockTransport`, and over
real HTTP on 127.0.0.1."""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
from PIL import Image

from reasoning_stage.backend import StreamingReasoningBackend
from reasoning_stage.errors import ReasoningInvalidOutput, ReasoningRejected, ReasoningUnavailable
from reasoning_stage.remote import RemoteReasoningBackend
from reasoning_stage.types import ChatMessage, ReasoningDelta, ReasoningRequest, ReasoningResult
from tests.images import decoded, image_bytes
from tests.servers import serving, unused_port
from tests.vllm_fake import FakeVllm, Recorded, decode_data_url, recorded, vllm_stream
from vision_stage.backend import VisionBackend
from vision_stage.description import NOT_JSON_NOTE
from vision_stage.errors import VisionInvalidOutput, VisionRejected, VisionUnavailable
from vision_stage.images import ImageLimits, decode_image
from vision_stage.prompts import task_prompt
from vision_stage.remote import RemoteVisionBackend
from vision_stage.types import Box, DetectedObject, KeyValue, VisionRequest, VisionResult, VisionTask

VISION_MODEL = "zai-org/GLM-4.6V-Flash"
LLM_MODEL = "zai-org/GLM-Z1-9B-0414"
BASE_URL = "http://vllm.test:8000/v1"
QUESTION = "Where is the total on this receipt?"
CHAT = (ChatMessage("system", "You answer briefly."), ChatMessage("user", "Is this receipt reimbursable?"))


async def look(
    fake: FakeVllm, request: VisionRequest, *, thinking: bool = False, pass_image_urls: bool = False
) -> VisionResult:
    backend = await RemoteVisionBackend.load(
        base_url=BASE_URL,
        model=fake.model,
        thinking=thinking,
        pass_image_urls=pass_image_urls,
        http_client=fake.client(),
    )
    try:
        return await backend.generate(request)
    finally:
        await backend.aclose()


async def ask(fake: FakeVllm, request: ReasoningRequest | None = None) -> ReasoningResult:
    backend = await RemoteReasoningBackend.load(base_url=BASE_URL, model=fake.model, http_client=fake.client())
    try:
        return await backend.generate(request or ReasoningRequest(CHAT))
    finally:
        await backend.aclose()


async def stream(fake: FakeVllm, deltas: list[ReasoningDelta]) -> None:
    """Stream `ReasoningRequest(CHAT)` into `deltas` (kept when it raises midway)."""
    backend = await RemoteReasoningBackend.load(base_url=BASE_URL, model=fake.model, http_client=fake.client())
    try:
        async for delta in backend.stream(ReasoningRequest(CHAT)):
            deltas.append(delta)
    finally:
        await backend.aclose()


def answer_request(task: VisionTask = "answer", image_url: str | None = None) -> VisionRequest:
    return VisionRequest(decoded((64, 48)), QUESTION, task=task, image_url=image_url)


# --- vision -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "recording", "measured"),
    [
        ("answer", "glm46v_answer_thinking", False),
        ("caption", "glm46v_caption_reasoning_field", False),
        ("describe", "glm46v_describe", True),
    ],
)
async def test_vision_forwards_an_rgb_png_undecoded_and_measures_colours_only_for_a_description(
    task: VisionTask, recording: str, measured: bool
) -> None:
    data = image_bytes("PNG", (64, 48), color="red")
    image = decode_image(data, ImageLimits())
    assert not image.pixels_decoded
    fake = FakeVllm(VISION_MODEL, [recorded(recording)])

    result = await look(fake, VisionRequest(image, QUESTION, task=task))

    [body] = fake.requests
    _, sent = decode_data_url(body["messages"][0]["content"][0]["image_url"]["url"])
    assert sent == data, "the upload's own bytes"
    assert image.pixels_decoded is measured
    assert [color.name for color in result.structured.facts.dominant_colors] == (["red"] if measured else [])
    assert (result.structured.facts.width, result.structured.facts.height) == (64, 48)


async def test_vision_sends_the_image_and_task_prompt_and_keeps_thinking_out_of_the_answer() -> None:
    fake = FakeVllm(VISION_MODEL, [recorded("glm46v_answer_thinking")])
    request = answer_request()
    result = await look(fake, request, thinking=True)

    [body] = fake.requests
    assert (body["temperature"], body["max_tokens"]) == (0, 1024)
    assert body["chat_template_kwargs"] == {"enable_thinking": True}
    [message] = body["messages"]
    assert message["role"] == "user"
    image_part, text_part = message["content"]
    assert text_part == {"type": "text", "text": task_prompt("answer", QUESTION)}
    subtype, data = decode_data_url(image_part["image_url"]["url"])
    sent = Image.open(io.BytesIO(data))
    assert subtype == "png"
    assert sent.format == "PNG"
    assert sent.convert("RGB").tobytes() == request.image.pixels.tobytes()

    assert result.answer == "The total, 54.06, is printed on the last line at the bottom right [[612,838,905,880]]."
    assert result.boxes == (Box(612, 838, 905, 880),)
    assert result.thinking is not None
    assert result.thinking.startswith("The user wants to know where the total is")
    assert "<|begin_of_box|>" not in result.answer
    assert "total" not in result.answer.split(".")[-1]
    assert (result.backend, result.model, result.task, result.caption) == ("remote", VISION_MODEL, "answer", "")
    assert result.latency_ms > 0
    assert result.notes == ()
    assert "64×48" in result.description


async def test_vision_describe_parses_the_json_description() -> None:
    fake = FakeVllm(VISION_MODEL, [recorded("glm46v_describe")])
    result = await look(fake, answer_request("describe"))

    [body] = fake.requests
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert body["messages"][0]["content"][1]["text"] == task_prompt("describe", QUESTION)
    assert result.caption == "A printed café receipt listing two lattes and a total of 54.06."
    structured = result.structured
    assert [line.text for line in structured.text_lines] == ["BLUE BOTTLE CAFE", "Latte 2 x 18.00 36.00", "TOTAL 54.06"]
    assert KeyValue("Total", "54.06") in structured.fields
    assert structured.objects == (DetectedObject("receipt", Box(40, 20, 960, 980)),)
    assert structured.layout is not None
    assert structured.layout.startswith("A single column")
    assert structured.facts.width == 64
    assert "“TOTAL 54.06”" in result.description
    assert "Caption: A printed café receipt" in result.description
    assert result.answer is None
    assert result.thinking is None


async def test_vision_reads_thinking_from_the_newer_vllm_reasoning_field() -> None:
    fake = FakeVllm(VISION_MODEL, [recorded("glm46v_caption_reasoning_field")])
    result = await look(fake, answer_request("caption"), thinking=True)

    assert fake.requests[0]["messages"][0]["content"][1]["text"] == task_prompt("caption", None)
    assert result.caption == "A printed café receipt on white paper with a total of 54.06."
    assert result.thinking == "A receipt, white paper, one sentence is enough."
    assert result.answer is None


async def test_vision_splits_a_think_block_left_in_the_content() -> None:
    fake = FakeVllm(VISION_MODEL, [recorded("glm46v_answer_think_in_content")])
    result = await look(fake, answer_request())

    assert result.thinking == "The question asks for the shop name; it is the top line."
    assert result.answer == "The shop is [[250,62,750,118]] BLUE BOTTLE CAFE."
    assert result.boxes == (Box(250, 62, 750, 118),)


async def test_vision_sends_a_jpeg_upload_as_jpeg() -> None:
    fake = FakeVllm(VISION_MODEL, [recorded("glm46v_answer_thinking")])
    photo = decode_image(image_bytes("JPEG", (80, 60)), ImageLimits())
    await look(fake, VisionRequest(photo, QUESTION, task="answer"))

    subtype, data = decode_data_url(fake.requests[0]["messages"][0]["content"][0]["image_url"]["url"])
    assert subtype == "jpeg"
    assert Image.open(io.BytesIO(data)).size == (80, 60)


@pytest.mark.parametrize(
    ("pass_image_urls", "image_url", "sent_as_is"),
    [
        (True, "https://images.example/receipt.png", True),
        (False, "https://images.example/receipt.png", False),
        (True, None, False),
    ],
)
async def test_vision_passes_a_client_url_through_only_when_configured(
    pass_image_urls: bool, image_url: str | None, sent_as_is: bool
) -> None:
    fake = FakeVllm(VISION_MODEL, [recorded("glm46v_answer_thinking")])
    await look(fake, answer_request(image_url=image_url), pass_image_urls=pass_image_urls)

    url = fake.requests[0]["messages"][0]["content"][0]["image_url"]["url"]
    assert (url == image_url) is sent_as_is
    assert url.startswith("data:image/png;base64,") is not sent_as_is


async def test_vision_notes_an_answer_cut_by_the_token_limit() -> None:
    fake = FakeVllm(VISION_MODEL, [vllm_stream(VISION_MODEL, ["A receipt on", " a white"], finish_reason="length")])
    result = await look(fake, answer_request("caption"))

    assert result.caption == "A receipt on a white"
    assert result.notes == ("the answer was cut at 1024 tokens",)


async def test_vision_thinking_that_uses_every_token_is_no_answer() -> None:
    fake = FakeVllm(VISION_MODEL, [vllm_stream(VISION_MODEL, ["<think>", "Still looking"], finish_reason="length")])
    with pytest.raises(VisionInvalidOutput, match="no answer: thinking used all 1024 tokens"):
        await look(fake, answer_request(), thinking=True)


async def test_vision_describe_without_json_keeps_the_model_s_text_with_a_note() -> None:
    fake = FakeVllm(VISION_MODEL, [vllm_stream(VISION_MODEL, ["A receipt. TOTAL 54.06 is printed at the bottom."])])
    result = await look(fake, answer_request("describe"))
    assert "TOTAL 54.06 is printed at the bottom." in result.description
    assert NOT_JSON_NOTE in result.notes


async def test_vision_answer_with_no_text_at_all_is_invalid_output_naming_the_backend() -> None:
    fake = FakeVllm(VISION_MODEL, [vllm_stream(VISION_MODEL, ["  \n "])])
    with pytest.raises(VisionInvalidOutput, match=r"remote vision backend \(http://vllm\.test:8000/v1.*no answer"):
        await look(fake, answer_request("describe"))


async def test_vision_answer_without_a_question_is_rejected_before_sending() -> None:
    fake = FakeVllm(VISION_MODEL, [])
    with pytest.raises(VisionRejected, match="needs a question"):
        await look(fake, VisionRequest(decoded(), None, task="answer"))
    assert fake.requests == []


# --- reasoning --------------------------------------------------------------------------------------------------------


async def test_reasoning_sends_the_chat_and_returns_text_thinking_and_usage() -> None:
    fake = FakeVllm(LLM_MODEL, [recorded("glm4_answer_reasoning")])
    result = await ask(fake, ReasoningRequest(CHAT, max_new_tokens=200, temperature=0.3))

    [body] = fake.requests
    assert body["messages"] == [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Is this receipt reimbursable?"},
    ]
    assert (body["max_tokens"], body["temperature"]) == (200, 0.3)
    assert "chat_template_kwargs" not in body
    assert result.text == (
        "Yes. The receipt is itemised and the total of 54.06 is within a typical meal allowance, so it is likely "
        "reimbursable."
    )
    assert result.thinking == (
        "Meals with a client are usually reimbursable when the receipt is itemised; 54.06 is under a typical limit."
    )
    assert (result.prompt_tokens, result.completion_tokens, result.finish_reason) == (412, 96, "stop")
    assert (result.backend, result.model) == ("remote", LLM_MODEL)
    assert result.latency_ms > 0


async def test_reasoning_streams_thinking_then_text_then_the_finish() -> None:
    fake = FakeVllm(LLM_MODEL, [recorded("glm4_answer_reasoning")])
    deltas: list[ReasoningDelta] = []
    await stream(fake, deltas)

    *pieces, last = deltas
    assert next(d.thinking for d in pieces if d.thinking) == "Meals with a client"
    assert all(not d.text for d in pieces[:5])
    assert all(not d.thinking for d in pieces[5:])
    assert "".join(d.text for d in pieces).strip().startswith("Yes. The receipt is itemised")
    assert all(d.finish_reason is None for d in pieces)
    assert last == ReasoningDelta(finish_reason="stop", prompt_tokens=412, completion_tokens=96)


async def test_reasoning_backend_is_a_streaming_backend() -> None:
    async with httpx.AsyncClient() as client:
        backend = await RemoteReasoningBackend.load(base_url=BASE_URL, model=LLM_MODEL, http_client=client)
        vision = await RemoteVisionBackend.load(base_url=BASE_URL, model=VISION_MODEL, http_client=client)
    assert isinstance(backend, StreamingReasoningBackend)
    assert isinstance(vision, VisionBackend)


async def test_reasoning_splits_think_tags_in_the_content_and_keeps_a_length_finish() -> None:
    fake = FakeVllm(LLM_MODEL, [recorded("glm4_think_in_content_length"), recorded("glm4_think_in_content_length")])
    result = await ask(fake)
    deltas: list[ReasoningDelta] = []
    await stream(fake, deltas)

    assert result.thinking == "Sum the items: 36.00 + 18.06."
    assert result.text == "The items add up to 54.06, which matches the"
    assert (result.finish_reason, result.prompt_tokens, result.completion_tokens) == ("length", 288, 24)
    assert not any("<" in d.text or ">" in d.text or "think>" in d.thinking for d in deltas)


async def test_reasoning_splits_think_tags_at_every_chunk_boundary() -> None:
    content = "<think>plan it</think>\n\nthe answer"
    for cut in range(1, len(content)):
        fake = FakeVllm(LLM_MODEL, [vllm_stream(LLM_MODEL, [content[:cut], content[cut:]])] * 2)
        deltas: list[ReasoningDelta] = []
        await stream(fake, deltas)
        result = await ask(fake)
        assert (result.thinking, result.text) == ("plan it", "the answer"), cut
        assert "".join(d.text for d in deltas) == "the answer", cut


async def test_reasoning_moves_a_think_block_opened_by_the_prompt_to_thinking() -> None:
    fake = FakeVllm(LLM_MODEL, [vllm_stream(LLM_MODEL, ["I add 36.00 and 18.06.", "</think>", "The sum is 54.06."])])
    result = await ask(fake)
    assert (result.thinking, result.text) == ("I add 36.00 and 18.06.", "The sum is 54.06.")


async def test_reasoning_without_usage_counts_zero_tokens() -> None:
    result = await ask(FakeVllm(LLM_MODEL, [recorded("glm4_answer_no_usage")]))
    assert (result.text, result.prompt_tokens, result.completion_tokens) == ("The total is 54.06.", 0, 0)


async def test_reasoning_stream_cut_midway_raises_after_the_deltas_it_gave() -> None:
    deltas: list[ReasoningDelta] = []
    with pytest.raises(ReasoningInvalidOutput, match="cut off"):
        await stream(FakeVllm(LLM_MODEL, [recorded("cut_stream")]), deltas)
    assert "".join(d.text for d in deltas) == "The total is 54."
    assert all(not d.finish_reason for d in deltas)


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
