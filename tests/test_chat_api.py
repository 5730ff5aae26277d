"""`POST /v1/chat/completions` and `GET /v1/models` driven by the official `openai` client, the app served under
uvicorn on 127.0.0.1 over scripted fake stages: every route, multi-turn, images, streaming and its failures."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam

from orchestrator.api.app import create_app
from orchestrator.api.chat_reply import ChatCompletionChunkOut, ChatCompletionOut, OrchestrationOut
from orchestrator.settings import Settings
from orchestrator.wiring import Backends
from reasoning_stage.backend import ReasoningBackend
from reasoning_stage.errors import ReasoningUnavailable
from reasoning_stage.local import LocalReasoningBackend
from reasoning_stage.types import ChatMessage
from tests.fakes import FakeReasoning, FakeStreamingReasoning, FakeVision
from tests.images import png_bytes
from tests.servers import RunningServer, data_url, image_message, openai_client, serving, sse_events
from tests.tiny_models import build_tiny_llama
from vision_stage.errors import VisionUnavailable

PNG = png_bytes()
IMAGE = data_url(PNG)
VISION_ANSWER = "Text in the image most relevant to the question: “TOTAL 54.06”."
WHY = "Why is the total 54.06?"


@contextmanager
def served(
    reasoning: ReasoningBackend | None = None, vision: FakeVision | None = None
) -> Iterator[tuple[OpenAI, RunningServer]]:
    backends = Backends(vision or FakeVision(), reasoning or FakeStreamingReasoning(answer="The total is 54.06."))
    with serving(create_app(Settings(), backends)) as server:
        yield openai_client(server), server


@pytest.fixture
def client() -> Iterator[OpenAI]:
    with served() as (client, _):
        yield client


def orchestration(response: ChatCompletion | ChatCompletionChunk) -> dict[str, Any]:
    extra = response.model_extra or {}
    details: dict[str, Any] = extra["orchestration"]
    OrchestrationOut.model_validate(details)
    return details


def ask(client: OpenAI, question: str, model: str = "auto", **options: Any) -> ChatCompletion:
    completion: ChatCompletion = client.chat.completions.create(
        model=model, messages=image_message(question, IMAGE), **options
    )
    return completion


def stream(client: OpenAI, messages: list[ChatCompletionMessageParam], **options: Any) -> list[ChatCompletionChunk]:
    options.setdefault("model", "auto")
    return list(client.chat.completions.create(messages=messages, stream=True, **options))


def content(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


@pytest.mark.parametrize(
    ("model", "question", "mode", "forced"),
    [
        ("auto", "What is the total?", "vision_only", False),
        ("auto", WHY, "vision_then_reasoning", False),
        ("vision-only", WHY, "vision_only", True),
        ("vision-then-reasoning", "What is the total?", "vision_then_reasoning", True),
    ],
)
def test_each_model_name_is_a_route(client: OpenAI, model: str, question: str, mode: str, forced: bool) -> None:
    completion = ask(client, question, model)
    details = orchestration(completion)
    assert (details["mode"], details["route"]["forced"]) == (mode, forced)
    assert completion.model == model
    assert completion.object == "chat.completion"
    (choice,) = completion.choices
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    expected = VISION_ANSWER if mode == "vision_only" else "The total is 54.06."
    assert choice.message.content == details["answer"] == expected
    assert completion.usage is not None
    assert (completion.usage.completion_tokens > 0) == (mode == "vision_then_reasoning")


def test_the_completion_is_exactly_the_documented_shape(client: OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=image_message(WHY, IMAGE))
    body = raw.http_response.json()
    assert set(body) == set(ChatCompletionOut.model_fields)
    assert set(body["orchestration"]) == set(OrchestrationOut.model_fields)
    ChatCompletionOut.model_validate(body)
    details = body["orchestration"]
    assert details["request_id"] == raw.headers["x-request-id"]
    assert details["arbitration"]["status"] == "agreed"
    assert details["vision"]["backend"] == "fake"
    assert (details["degraded"], details["replaced"], details["needs_human_review"]) == (False, False, False)
    assert set(details["timings_ms"]) == {"route", "vision", "reasoning", "arbitration", "total"}


def test_models_lists_the_three_routes(client: OpenAI) -> None:
    assert [model.id for model in client.models.list()] == ["auto", "vision-only", "vision-then-reasoning"]


def test_streaming_sends_the_llms_words_as_they_come_then_the_orchestration_and_usage(client: OpenAI) -> None:
    chunks = stream(client, image_message(WHY, IMAGE), stream_options={"include_usage": True})
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [
        chunk.choices[0].delta.content for chunk in chunks[1:] if chunk.choices and chunk.choices[0].delta.content
    ]
    assert pieces == ["The", " total", " is", " 54.06."]
    *_, final, usage = chunks
    assert final.choices[0].finish_reason == "stop"
    details = orchestration(final)
    assert (details["answer"], details["mode"], details["replaced"]) == (
        "The total is 54.06.",
        "vision_then_reasoning",
        False,
    )
    assert usage.choices == []
    assert usage.usage is not None
    assert usage.usage.completion_tokens == 4
    assert len({chunk.id for chunk in chunks}) == 1


def test_the_vision_only_route_streams_the_vision_answer_as_content(client: OpenAI) -> None:
    chunks = stream(client, image_message("What is the total?", IMAGE), model="vision-only")
    assert content(chunks) == VISION_ANSWER
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is None  # no usage chunk unless asked for
    assert orchestration(chunks[-1])["mode"] == "vision_only"


def test_a_reasoning_backend_that_cannot_stream_sends_its_answer_in_one_piece() -> None:
    with served(FakeReasoning(answer="The total is 54.06.")) as (client, _):
        chunks = stream(client, image_message(WHY, IMAGE))
    pieces = [
        chunk.choices[0].delta.content for chunk in chunks[1:] if chunk.choices and chunk.choices[0].delta.content
    ]
    assert pieces == ["The total is 54.06."]
    assert orchestration(chunks[-1])["mode"] == "vision_then_reasoning"


def test_raw_chunks_are_the_documented_shape_and_end_with_done(client: OpenAI) -> None:
    body = {"model": "auto", "stream": True, "messages": image_message(WHY, IMAGE)}
    response = httpx.post(f"{str(client.base_url).rstrip('/')}/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        ChatCompletionChunkOut.model_validate_json(event)
    assert '"orchestration"' in events[-2]
    assert '"reasoning_content"' not in "".join(events)  # unset fields are left out


def test_multi_turn_uses_the_latest_image_and_gives_the_llm_the_history() -> None:
    vision, reasoning = FakeVision(), FakeStreamingReasoning(answer="Because of the two lattes.")
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "Be brief."},
        *image_message("What is the total?", data_url(png_bytes((32, 32)))),
        {"role": "assistant", "content": "The total is 54.06."},
        *image_message("And on this one?", data_url(png_bytes((80, 40)))),
        {"role": "assistant", "content": "Also 54.06."},
        {"role": "user", "content": WHY},
    ]
    with served(reasoning, vision) as (client, _):
        completion = client.chat.completions.create(model="auto", messages=messages)
    assert completion.choices[0].message.content == "Because of the two lattes."
    assert [(r.image.width, r.question) for r in vision.requests] == [(80, WHY)]
    (request,) = reasoning.requests
    assert request.messages[1:6] == (
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "What is the total?"),
        ChatMessage("assistant", "The total is 54.06."),
        ChatMessage("user", "And on this one?"),
        ChatMessage("assistant", "Also 54.06."),
    )
    assert request.messages[0].content.startswith("You answer questions about an image you cannot see.")
    assert request.messages[-1].content.endswith(f"Question: {WHY}")


def test_temperature_and_max_tokens_reach_the_reasoning_stage() -> None:
    reasoning = FakeStreamingReasoning()
    with served(reasoning) as (client, _):
        ask(client, WHY, temperature=0.3, max_tokens=17)
        stream(client, image_message(WHY, IMAGE), max_completion_tokens=9)
        with pytest.raises(openai.UnprocessableEntityError):
            ask(client, WHY, max_tokens=100_000)
        with pytest.raises(openai.UnprocessableEntityError):
            ask(client, WHY, temperature=3)
    assert [(r.temperature, r.max_new_tokens) for r in reasoning.requests] == [(0.3, 17), (0.0, 9)]


def test_a_reasoning_failure_before_the_first_chunk_falls_back_to_the_vision_answer() -> None:
    with served(FakeStreamingReasoning(error=ReasoningUnavailable("down"))) as (client, _):
        chunks = stream(client, image_message("为什么这么贵？", IMAGE))
        completion = client.chat.completions.create(model="auto", messages=image_message("为什么这么贵？", IMAGE))
    assert content(chunks) == completion.choices[0].message.content == VISION_ANSWER
    for details in (orchestration(chunks[-1]), orchestration(completion)):
        assert (details["degraded"], details["mode"]) == (True, "vision_only")
        assert details["notices"][0].startswith("推理服务不可用")
        assert details["failures"][0]["stage"] == "reasoning"


def test_a_reasoning_failure_mid_answer_is_an_in_band_error_the_client_raises() -> None:
    reasoning = FakeStreamingReasoning(answer="The total is 54.06.", fail_after=2)
    received: list[str] = []

    def read(client: OpenAI) -> None:
        for chunk in client.chat.completions.create(model="auto", messages=image_message(WHY, IMAGE), stream=True):
            received.append(chunk.choices[0].delta.content or "")

    with served(reasoning) as (client, server):
        with pytest.raises(openai.APIError) as raised:
            read(client)
        body = {"model": "auto", "stream": True, "messages": image_message(WHY, IMAGE)}
        events = sse_events(httpx.post(f"{server.base_url}/chat/completions", json=body))
    assert "".join(received) == "The total"
    assert "reasoning stage (backend fake) failed mid-answer" in raised.value.message
    assert raised.value.type == "reasoning_unavailable"
    assert json.loads(events[-2])["error"]["type"] == "reasoning_unavailable"
    assert events[-1] == "[DONE]"
    assert all('"finish_reason":"stop"' not in event for event in events)  # never passed off as a finished answer


def test_a_corrected_answer_follows_the_streamed_one_with_the_notice() -> None:
    reasoning = FakeStreamingReasoning(script=("The total is 8.00.", "The total is 54.06."))
    with served(reasoning) as (client, _):
        chunks = stream(client, image_message("Is this bill reasonable?", IMAGE))
    details = orchestration(chunks[-1])
    assert (details["answer"], details["replaced"], details["arbitration"]["status"]) == (
        "The total is 54.06.", True, "corrected"
    )  # fmt: skip
    notice = "The first answer contradicted the image; this answer was corrected against it."
    assert content(chunks) == f"The total is 8.00.\n\n{notice}\n\nThe total is 54.06."


def test_a_json_object_response_format_answers_with_checked_fields() -> None:
    with served(FakeStreamingReasoning(answer='{"total": "54.06"}')) as (client, _):
        completion = ask(client, "What is the total?", response_format={"type": "json_object"})
    details = orchestration(completion)
    assert completion.choices[0].message.content == '{"total":"54.06"}'
    assert (details["answer_fields"], details["mode"]) == ({"total": "54.06"}, "vision_then_reasoning")


def test_the_content_streams_while_the_llm_is_still_writing() -> None:
    gate = threading.Event()
    try:
        with served(FakeStreamingReasoning(answer="The total is 54.06.", gate=gate)) as (client, _):
            client = client.with_options(timeout=5)  # a server holding chunks back would wait for the gate
            chunks = client.chat.completions.create(model="auto", messages=image_message(WHY, IMAGE), stream=True)
            received = []
            for chunk in chunks:
                received.append(chunk.choices[0].delta.content if chunk.choices else None)
                if received[-1] == "The":
                    assert not gate.is_set()
                    gate.set()
    finally:
        gate.set()
    assert "".join(piece or "" for piece in received) == "The total is 54.06."


@pytest.mark.parametrize(
    ("messages", "error", "type_"),
    [
        (image_message("What?", "ftp://example.com/a.png"), openai.BadRequestError, "image_url_not_supported"),
        (image_message("What?", data_url(PNG[:60])), openai.BadRequestError, "image_corrupt"),
        (image_message("What?", "data:image/png;base64,@@@"), openai.BadRequestError, "invalid_base64"),
        (image_message("What?", data_url(b"%PDF-1.4")), openai.APIStatusError, "image_unsupported"),
        ([{"role": "user", "content": "What is the total?"}], openai.BadRequestError, "image_missing"),
        (image_message("   ", IMAGE), openai.UnprocessableEntityError, "validation_error"),
        ([*image_message("What?", IMAGE), {"role": "assistant", "content": "54"}], openai.UnprocessableEntityError,
         "validation_error"),
        ([{"role": "tool", "content": "x", "tool_call_id": "1"}], openai.UnprocessableEntityError, "validation_error"),
    ],
)  # fmt: skip
def test_bad_requests_raise_the_openai_clients_matching_error(
    client: OpenAI, messages: list[ChatCompletionMessageParam], error: type[openai.APIStatusError], type_: str
) -> None:
    for streamed in (False, True):
        with pytest.raises(error) as raised:
            client.chat.completions.create(model="auto", messages=messages, stream=streamed)
        assert raised.value.type == type_
        assert raised.value.body["request_id"] == raised.value.response.headers["x-request-id"]  # type: ignore[index]


def test_an_unknown_model_is_not_found_and_unknown_fields_are_refused(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        ask(client, "What?", "gpt-4o")
    assert raised.value.type == "not_found"
    assert "vision-then-reasoning" in raised.value.message
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        ask(client, "What?", extra_body={"colour": "red"})
    assert "colour" in refused.value.message
    with pytest.raises(openai.UnprocessableEntityError):
        ask(client, "What?", n=2)


def test_the_vision_stage_down_is_a_503_before_any_chunk() -> None:
    with served(vision=FakeVision(error=VisionUnavailable("ocr down", retry_after_s=7))) as (client, server):
        with pytest.raises(openai.InternalServerError) as raised:
            stream(client, image_message(WHY, IMAGE))
        assert raised.value.status_code == 503
        assert raised.value.response.headers["retry-after"] == "7"
        assert raised.value.type == "vision_unavailable"
        invalid = httpx.post(f"{server.base_url}/chat/completions", content=b"{not json",
                             headers={"content-type": "application/json"})  # fmt: skip
        assert (invalid.status_code, invalid.json()["error"]["type"]) == (400, "invalid_json")


@pytest.mark.slow
def test_a_real_local_llm_streams_token_by_token_through_the_chat_endpoint(tmp_path: Path) -> None:
    """A tiny random Llama behind the `local` backend's real `stream`: garbage words, but streamed, counted, cut at
    `max_tokens`, and the streamed content is the answer unless the arbiter replaced it."""
    llm = asyncio.run(LocalReasoningBackend.load(str(build_tiny_llama(tmp_path, stops="never"))))
    with served(llm) as (client, _):
        chunks = stream(client, image_message(WHY, IMAGE), max_tokens=8, stream_options={"include_usage": True})
    pieces = [
        chunk.choices[0].delta.content for chunk in chunks[1:] if chunk.choices and chunk.choices[0].delta.content
    ]
    *_, final, usage = chunks
    details = orchestration(final)
    assert details["mode"] == "vision_then_reasoning"
    assert len(pieces) > 1
    assert final.choices[0].finish_reason == "length"
    assert usage.usage is not None
    assert usage.usage.completion_tokens == 8
    if not details["replaced"]:
        assert "".join(pieces) == details["answer"]
