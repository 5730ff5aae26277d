"""The `remote` backends' answers against recorded vLLM responses (`tests/recorded/`), through `httpx.MockTransport`:
what each stage sends and reads. Failures, health and loopback HTTP are in `test_remote_failures.py`."""

from __future__ import annotations

import io

import httpx
import pytest
from PIL import Image

from reasoning_stage.backend import StreamingReasoningBackend
from reasoning_stage.errors import ReasoningInvalidOutput
from reasoning_stage.remote import RemoteReasoningBackend
from reasoning_stage.types import ReasoningDelta, ReasoningRequest
from tests.images import decoded, image_bytes
from tests.remote_backends import (
    BASE_URL,
    CHAT,
    LLM_MODEL,
    QUESTION,
    VISION_MODEL,
    answer_request,
    ask,
    look,
    stream,
)
from tests.vllm_fake import FakeVllm, decode_data_url, recorded, vllm_stream
from vision_stage.backend import VisionBackend
from vision_stage.description import NOT_JSON_NOTE
from vision_stage.errors import VisionInvalidOutput, VisionRejected
from vision_stage.images import ImageLimits, decode_image
from vision_stage.prompts import task_prompt
from vision_stage.remote import RemoteVisionBackend
from vision_stage.types import Box, DetectedObject, KeyValue, VisionRequest, VisionTask

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
