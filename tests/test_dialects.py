"""Each dialect of a `remote` stage (`stage_protocol.client.dialects`) against recordings of that server's real format
(`tests/recorded/README.md` cites the versions and source lines): the request body sent, fields present and absent;
the reading of its streams; and the reading of its error bodies, as that server means them."""

from __future__ import annotations

import base64
import io
import os
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from orchestrator.api.app import create_app
from orchestrator.settings import CacheSettings, RouterSettings, Settings
from orchestrator.stage_settings import (
    BreakerSettings,
    NoneReasoningSettings,
    RemoteReasoningSettings,
    RemoteVisionSettings,
    RetrySettings,
)
from reasoning_stage.errors import ReasoningRejected, ReasoningUnavailable
from reasoning_stage.remote import RemoteReasoningBackend
from reasoning_stage.types import ChatMessage, ReasoningRequest, ReasoningResult
from stage_protocol.client import DialectName
from tests.images import image_bytes
from tests.servers import serving
from tests.vllm_fake import FakeVllm, decode_data_url, recorded
from vision_stage.errors import ImageCorrupt, VisionError, VisionInvalidOutput, VisionRejected, VisionUnavailable
from vision_stage.images import ImageLimits, decode_image
from vision_stage.remote import ALL_REASONING_NOTE, RemoteVisionBackend
from vision_stage.types import Box, KeyValue, VisionRequest, VisionResult, VisionTask

BASE_URL = "http://server.test/v1"
VISION_MODEL = "zai-org/GLM-4.6V-Flash"
LLM_MODEL = "zai-org/GLM-4-9B-0414"
CHAT = (ChatMessage("system", "Answer briefly."), ChatMessage("user", "What is the total?"))


async def look(
    fake: FakeVllm, dialect: DialectName, task: VisionTask = "answer", *, thinking: bool = False, image: bytes = b""
) -> VisionResult:
    fake.dialect = dialect
    data = image or image_bytes("PNG", (64, 48))
    backend = await RemoteVisionBackend.load(
        base_url=BASE_URL,
        model=fake.model,
        http_client=fake.client(),
        dialect_name=dialect,
        thinking=thinking,
        max_new_tokens=512,
    )
    try:
        return await backend.generate(VisionRequest(decode_image(data, ImageLimits()), "What is the total?", task=task))
    finally:
        await backend.aclose()


async def ask(fake: FakeVllm, dialect: DialectName, temperature: float = 0.0) -> ReasoningResult:
    fake.dialect = dialect
    backend = await RemoteReasoningBackend.load(
        base_url=BASE_URL, model=fake.model, http_client=fake.client(), dialect_name=dialect
    )
    try:
        return await backend.generate(ReasoningRequest(CHAT, max_new_tokens=256, temperature=temperature))
    finally:
        await backend.aclose()


# --- what each dialect sends ------------------------------------------------------------------------------------------

VISION_BODIES: dict[str, dict[str, Any]] = {
    "auto": {"temperature": 0.0, "max_tokens": 512, "stream_options": {"include_usage": True},
             "chat_template_kwargs": {"enable_thinking": False}},
    "vllm": {"temperature": 0.0, "max_tokens": 512, "stream_options": {"include_usage": True},
             "chat_template_kwargs": {"enable_thinking": False}, "skip_special_tokens": False},
    "sglang": {"temperature": 0.0, "max_tokens": 512, "stream_options": {"include_usage": True},
               "chat_template_kwargs": {"enable_thinking": False}, "skip_special_tokens": False},
    "openai": {"temperature": 0.0, "max_completion_tokens": 512, "stream_options": {"include_usage": True}},
    "zhipu": {"do_sample": False, "max_tokens": 512, "thinking": {"type": "disabled"}},
}  # fmt: skip


@pytest.mark.parametrize("dialect", list(VISION_BODIES))
async def test_the_vision_request_holds_exactly_what_the_dialect_sends(dialect: DialectName) -> None:
    fake = FakeVllm(VISION_MODEL, [recorded("zhipu_glm46v_answer")])
    data = image_bytes("PNG", (64, 48), color="red")
    await look(fake, dialect, image=data)

    [body] = fake.requests
    assert {k: v for k, v in body.items() if k not in ("model", "messages", "stream")} == VISION_BODIES[dialect]
    assert body["stream"] is True
    [message] = body["messages"]
    image_part, text_part = message["content"]
    url = image_part["image_url"]["url"]
    if dialect == "zhipu":  # bare base64, as the vendor's SDK sends it
        assert not url.startswith("data:")
        assert base64.b64decode(url) == data
    else:
        assert decode_data_url(url) == ("png", data)
    assert text_part["text"].endswith("What is the total?")


async def test_zhipu_thinking_is_switched_on_only_when_asked() -> None:
    fake = FakeVllm(VISION_MODEL, [recorded("zhipu_glm46v_thinking")])
    result = await look(fake, "zhipu", thinking=True)
    assert fake.requests[0]["thinking"] == {"type": "enabled"}
    assert result.thinking == "用户问合计金额。"
    assert result.answer == "合计金额为 80.00 元。"


REASONING_BODIES: dict[str, dict[str, Any]] = {
    "auto": {"temperature": 0.3, "max_tokens": 256, "stream_options": {"include_usage": True}},
    "vllm": {"temperature": 0.3, "max_tokens": 256, "stream_options": {"include_usage": True}},
    "sglang": {"temperature": 0.3, "max_tokens": 256, "stream_options": {"include_usage": True}},
    "openai": {"temperature": 0.3, "max_completion_tokens": 256, "stream_options": {"include_usage": True}},
    "zhipu": {"temperature": 0.3, "max_tokens": 256, "thinking": {"type": "disabled"}},
}


@pytest.mark.parametrize("dialect", list(REASONING_BODIES))
async def test_the_reasoning_request_holds_exactly_what_the_dialect_sends(dialect: DialectName) -> None:
    fake = FakeVllm(LLM_MODEL, [recorded("zhipu_glm46v_answer")])
    await ask(fake, dialect, temperature=0.3)
    [body] = fake.requests
    assert {k: v for k, v in body.items() if k not in ("model", "messages", "stream")} == REASONING_BODIES[dialect]
    assert body["messages"] == [{"role": m.role, "content": m.content} for m in CHAT]


@pytest.mark.parametrize(("temperature", "sent"), [(0.0, {"do_sample": False}), (1.7, {"temperature": 1.0})])
async def test_zhipu_gets_greedy_decoding_as_do_sample_and_a_temperature_of_at_most_1(
    temperature: float, sent: dict[str, object]
) -> None:
    fake = FakeVllm(LLM_MODEL, [recorded("zhipu_glm46v_answer")])
    await ask(fake, "zhipu", temperature=temperature)
    body = fake.requests[0]
    assert {key: body[key] for key in sent} == sent
    assert not ({"do_sample", "temperature"} - set(sent)) & set(body)


async def test_zhipu_gets_an_image_scaled_to_its_side_limit_with_a_note() -> None:
    fake = FakeVllm(VISION_MODEL, [recorded("zhipu_glm46v_answer")])
    result = await look(fake, "zhipu", image=image_bytes("PNG", (6400, 40)))
    sent = Image.open(io.BytesIO(base64.b64decode(fake.requests[0]["messages"][0]["content"][0]["image_url"]["url"])))
    assert max(sent.size) == 6000
    assert any("re-encoded to fit the server's limits" in note for note in result.notes)


async def test_zhipu_gets_an_image_under_its_byte_limit_as_jpeg() -> None:
    noise = Image.frombytes("RGB", (1400, 1400), os.urandom(1400 * 1400 * 3))  # incompressible: > 5 MB as PNG
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    assert len(buffer.getvalue()) > 5 * 1024 * 1024
    fake = FakeVllm(VISION_MODEL, [recorded("zhipu_glm46v_answer")])
    result = await look(fake, "zhipu", image=buffer.getvalue())
    sent = base64.b64decode(fake.requests[0]["messages"][0]["content"][0]["image_url"]["url"])
    assert len(sent) <= 5 * 1024 * 1024
    assert Image.open(io.BytesIO(sent)).format == "JPEG"
    assert any("sent as JPEG" in note for note in result.notes)


# --- reading each server's streams ------------------------------------------------------------------------------------


async def test_vllm_0_13_sends_thinking_in_both_fields_and_it_is_read_once() -> None:
    result = await look(FakeVllm(VISION_MODEL, [recorded("vllm_0_13_glm46v_answer_both_fields")]), "vllm")
    assert result.thinking == "The user asks for the total. The receipt's last line reads TOTAL 80.00."
    assert result.answer == "The total is 80.00 [[612,838,905,880]]."
    assert result.boxes == (Box(612, 838, 905, 880),)  # the markers were stripped: the bare coordinates still count


async def test_vllm_0_13_reasoning_stream_is_read_once_too() -> None:
    result = await ask(FakeVllm(LLM_MODEL, [recorded("vllm_0_13_glm46v_answer_both_fields")]), "vllm")
    assert result.thinking == "The user asks for the total. The receipt's last line reads TOTAL 80.00."
    assert result.text == "The total is 80.00 [[612,838,905,880]]."
    assert (result.prompt_tokens, result.completion_tokens) == (1389, 42)


async def test_vllm_0_16_markdown_description_is_kept_and_read() -> None:
    result = await look(FakeVllm(VISION_MODEL, [recorded("vllm_0_16_glm46v_describe_markdown")]), "vllm", "describe")
    assert result.thinking == "A receipt; read it line by line."
    assert "| Croissant | 1 | 44.00 |" in result.description
    fields = result.structured.fields
    assert KeyValue("Total", "80.00") in fields
    assert KeyValue("Latte", "Qty: 2, Amount: 36.00") in fields
    assert KeyValue("Merchant", "BLUE BOTTLE CAFE") in fields
    assert result.boxes == (Box(250, 62, 750, 118), Box(612, 838, 905, 880))


async def test_vllm_0_34_description_with_kept_markers_gives_located_lines() -> None:
    recording = recorded("vllm_0_34_glm46v_describe_markers_kept")
    result = await look(FakeVllm(VISION_MODEL, [recording]), "vllm", "describe")
    assert [line.text for line in result.structured.text_lines] == ["BLUE BOTTLE CAFE", "TOTAL 80.00"]
    assert result.structured.text_lines[1].box[0] == pytest.approx((612 * 64 / 1000, 838 * 48 / 1000))
    assert result.notes == ()


async def test_sglang_0_5_3_boxed_answer_is_the_answer_not_a_box() -> None:
    result = await look(FakeVllm(VISION_MODEL, [recorded("sglang_0_5_3_glm46v_answer")]), "sglang")
    assert result.answer == "合计：80.00"
    assert result.boxes == ()
    assert result.thinking == "Find the total line."


async def test_sglang_0_5_23_description_with_chinese_keys_is_read() -> None:
    recording = recorded("sglang_0_5_23_glm46v_describe_chinese_keys")
    result = await look(FakeVllm(VISION_MODEL, [recording]), "sglang", "describe")
    assert result.caption == "一张咖啡店小票"
    lines = [line.text for line in result.structured.text_lines]
    assert lines == ["BLUE BOTTLE CAFE", "拿铁 2 x 18.00 36.00", "合计 80.00"]
    assert KeyValue("合计", "80.00") in result.structured.fields
    assert [o.label for o in result.structured.objects] == ["小票"]


async def test_openai_stream_with_usage_null_and_obfuscation_on_every_chunk() -> None:
    result = await look(FakeVllm(VISION_MODEL, [recorded("openai_gpt4o_answer")]), "openai")
    assert result.answer == "The total is 80.00."
    reasoning = await ask(FakeVllm(LLM_MODEL, [recorded("openai_gpt4o_answer")]), "openai")
    assert (reasoning.text, reasoning.prompt_tokens, reasoning.completion_tokens) == ("The total is 80.00.", 812, 7)


async def test_openai_rate_limit_keeps_its_retry_after() -> None:
    with pytest.raises(VisionUnavailable) as caught:
        await look(FakeVllm(VISION_MODEL, [recorded("openai_error_429_rate_limit")]), "openai")
    assert caught.value.retry_after_s == 2.0


async def test_zhipu_answer_with_usage_in_the_last_choice_chunk() -> None:
    result = await look(FakeVllm(VISION_MODEL, [recorded("zhipu_glm46v_answer")]), "zhipu")
    assert result.answer == "The total is 80.00."
    reasoning = await ask(FakeVllm(LLM_MODEL, [recorded("zhipu_glm46v_thinking")]), "zhipu")
    assert (reasoning.text, reasoning.thinking) == ("合计金额为 80.00 元。", "用户问合计金额。")
    assert (reasoning.prompt_tokens, reasoning.completion_tokens) == (1391, 30)


# --- reading each server's errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "dialect", "error", "says", "retryable"),
    [
        ("vllm_0_10_0_error_404_flat", "vllm", VisionRejected, "does not exist", None),
        ("vllm_0_19_error_500_truncated_image", "vllm", ImageCorrupt, "image file is truncated", None),
        ("vllm_0_20_error_400_failed_to_load_image", "vllm", ImageCorrupt, "Failed to load image", None),
        ("vllm_0_19_error_500_truncated_image", "auto", ImageCorrupt, "image file is truncated", None),
        ("vllm_0_14_stream_error_400", "vllm", VisionUnavailable, "EngineCore encountered an issue", False),
        ("vllm_0_14_stream_error_400", "auto", VisionRejected, "EngineCore encountered an issue", None),
        ("sglang_error_400_flat", "sglang", VisionRejected, "longer than the model's context length", None),
        ("sglang_stream_error_500", "sglang", VisionUnavailable, "CUDA out of memory", False),
        ("zhipu_error_1113", "zhipu", VisionUnavailable, "balance is exhausted", False),
        ("zhipu_error_1305", "zhipu", VisionUnavailable, "该模型当前访问量过大", True),
        ("zhipu_error_1301", "zhipu", VisionRejected, "safety check", None),
        ("zhipu_error_1214", "zhipu", VisionRejected, "temperature参数非法", None),
        ("zhipu_sensitive", "zhipu", VisionRejected, "finish_reason sensitive", None),
        ("openai_error_429_insufficient_quota", "openai", VisionUnavailable, "quota is used up", False),
        ("openai_error_429_rate_limit", "openai", VisionUnavailable, "Rate limit reached", True),
        ("openai_error_400_context_length", "openai", VisionRejected, "maximum context length", None),
        ("zhipu_network_error", "zhipu", VisionUnavailable, "finish_reason network_error", False),
    ],
)
async def test_vision_errors_are_read_as_the_server_means_them(
    name: str, dialect: DialectName, error: type[VisionError], says: str, retryable: bool | None
) -> None:
    with pytest.raises(error, match=says) as caught:
        await look(FakeVllm(VISION_MODEL, [recorded(name)]), dialect)
    assert type(caught.value) is error
    if retryable is not None:
        assert isinstance(caught.value, VisionUnavailable)
        assert caught.value.retryable is retryable


@pytest.mark.parametrize(
    ("name", "error", "says", "retryable"),
    [
        ("zhipu_error_1113", ReasoningUnavailable, "余额不足", False),
        ("zhipu_error_1301", ReasoningRejected, "系统检测到输入或生成内容可能包含不安全或敏感内容", None),
        ("zhipu_sensitive", ReasoningRejected, "sensitive", None),
        ("zhipu_network_error", ReasoningUnavailable, "network_error", False),  # text had arrived: not again
    ],
)
async def test_reasoning_errors_are_read_as_the_server_means_them(
    name: str, error: type[Exception], says: str, retryable: bool | None
) -> None:
    with pytest.raises(error, match=says) as caught:
        await ask(FakeVllm(LLM_MODEL, [recorded(name)]), "zhipu")
    if retryable is not None:
        assert isinstance(caught.value, ReasoningUnavailable)
        assert caught.value.retryable is retryable


# --- what the service makes of them -----------------------------------------------------------------------------------

POLICY: dict[str, Any] = {
    "retry": RetrySettings(attempts=3, backoff_s=0.0, backoff_max_s=0.0),
    "breaker": BreakerSettings(failures=1, min_calls=1),  # one failure that counts opens it
}


def analyze_over_loopback(fake: FakeVllm, dialect: DialectName, **policy: Any) -> tuple[int, dict[str, Any], str]:
    """POST /v1/analyze (vision route) to the service with `fake` as its vision server, in `dialect`; (status, body,
    the endpoint's breaker state afterwards)."""
    fake.dialect = dialect
    with serving(fake.app()) as server:
        vision = RemoteVisionSettings(base_url=server.base_url, model=fake.model, dialect=dialect, **(POLICY | policy))
        settings = Settings(
            vision=vision,
            reasoning=NoneReasoningSettings(),
            router=RouterSettings(kind="keyword"),
            cache=CacheSettings(enabled=False),
        )
        with TestClient(create_app(settings)) as client:
            image = base64.b64encode(image_bytes("PNG", (64, 48))).decode()
            response = client.post("/v1/analyze", json={"image_base64": image, "question": "total?", "mode": "vision"})
            breaker = client.get("/ready").json()["vision"]["endpoints"][0]["breaker"]
    return response.status_code, response.json(), breaker


def test_an_image_vllm_could_not_decode_is_a_400_asked_once_with_no_breaker_verdict() -> None:
    fake = FakeVllm(VISION_MODEL, [recorded("vllm_0_19_error_500_truncated_image")])
    status, body, breaker = analyze_over_loopback(fake, "vllm")
    assert (status, body["error"]["type"]) == (400, "image_corrupt")
    assert "image file is truncated" in body["error"]["message"]
    assert len(fake.requests) == 1  # not retried
    assert breaker == "closed"  # the endpoint is not to blame


def test_an_exhausted_balance_is_asked_once_and_counts_against_the_endpoint() -> None:
    fake = FakeVllm(VISION_MODEL, [recorded("zhipu_error_1113")])
    status, body, breaker = analyze_over_loopback(fake, "zhipu")
    assert (status, body["error"]["type"]) == (503, "vision_unavailable")
    assert "balance is exhausted" in body["error"]["message"]
    assert len(fake.requests) == 1  # waiting does not refill it
    assert breaker == "open"


def test_a_rate_limit_of_the_vendor_is_retried() -> None:
    fake = FakeVllm(VISION_MODEL, [recorded("zhipu_error_1305"), recorded("zhipu_glm46v_answer")])
    status, body, _ = analyze_over_loopback(fake, "zhipu", breaker=BreakerSettings(failures=5, min_calls=5))
    assert status == 200
    assert body["answer"] == "The total is 80.00."
    assert len(fake.requests) == 2


def test_the_dialect_is_a_setting() -> None:
    remote = {"base_url": "http://127.0.0.1:1/v1", "model": "m"}
    assert RemoteVisionSettings.model_validate({**remote, "dialect": "zhipu"}).dialect == "zhipu"
    with pytest.raises(ValueError, match="dialect"):
        RemoteReasoningSettings.model_validate({**remote, "dialect": "ollama"})


async def test_an_answer_sent_entirely_as_reasoning_is_read_as_the_answer_when_thinking_was_not_asked() -> None:
    recording = recorded("vllm_0_20_glm46v_answer_all_reasoning")
    result = await look(FakeVllm(VISION_MODEL, [recording]), "openai")  # no thinking switch: the parser assumed one
    assert result.answer == "The total is 80.00."
    assert result.thinking is None
    assert ALL_REASONING_NOTE in result.notes
    with pytest.raises(VisionInvalidOutput, match="gave no answer"):  # thinking asked for: it stays thinking
        await look(FakeVllm(VISION_MODEL, [recording]), "openai", thinking=True)
