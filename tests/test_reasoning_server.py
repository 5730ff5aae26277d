"""The reasoning stage's own OpenAI-compatible server, on 127.0.0.1 under uvicorn, driven by the official `openai`
client: over a tiny random Llama (and, marked slow, the embedded SmolLM2), and over fakes scripting every stage error,
thinking, and failures mid-stream."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from reasoning_stage import errors as reasoning_errors
from reasoning_stage import server as reasoning_server
from reasoning_stage.local import LocalReasoningBackend
from reasoning_stage.types import ReasoningDelta, ReasoningRequest
from tests.fakes import FakeReasoning
from tests.images import png_bytes
from tests.servers import RunningServer, data_url, image_message, openai_client, reset, serving, sse_events
from tests.tiny_models import build_tiny_llama

CHAT: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "you are a helpful assistant"},
    {"role": "user", "content": "what is the total ?"},
]


@dataclass
class StreamingFake(FakeReasoning):
    """`FakeReasoning` that streams `deltas`, then raises `fail_with`, or (with `hang`) waits forever."""

    deltas: tuple[ReasoningDelta, ...] = ()
    fail_with: Exception | None = None
    hang: bool = False
    stream_closed: threading.Event = field(default_factory=threading.Event)

    async def stream(self, request: ReasoningRequest) -> AsyncIterator[ReasoningDelta]:
        try:
            for delta in self.deltas:
                yield delta
            if self.fail_with is not None:
                raise self.fail_with
            if self.hang:
                await asyncio.Event().wait()
        finally:
            self.stream_closed.set()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), stops="never")


@pytest.fixture(scope="module")
def llama_server(tiny_llama: Path) -> Iterator[RunningServer]:
    backend = asyncio.run(LocalReasoningBackend.load(str(tiny_llama)))
    with serving(reasoning_server.create_app(backend, served_model_name="tiny-llama")) as server:
        yield server


@pytest.fixture(scope="module")
def reasoning_fake_server() -> Iterator[tuple[StreamingFake, RunningServer]]:
    reasoning = StreamingFake()
    with serving(reasoning_server.create_app(reasoning, served_model_name="fake-llm")) as server:
        yield reasoning, server
    assert reasoning.closed


@pytest.fixture
def fake_reasoning(reasoning_fake_server: tuple[StreamingFake, RunningServer]) -> tuple[StreamingFake, RunningServer]:
    reset(reasoning_fake_server[0], StreamingFake())
    return reasoning_fake_server


# -- the reasoning server over a tiny Llama ----------------------------------------------------------------------------


async def test_streamed_deltas_add_up_to_the_plain_answer(llama_server: RunningServer) -> None:
    async with AsyncOpenAI(base_url=llama_server.base_url, api_key="x", max_retries=0) as llm:
        plain = await llm.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=12)
        stream = await llm.chat.completions.create(
            model="tiny-llama",
            messages=CHAT,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]

    assert plain.usage is not None
    assert (plain.usage.completion_tokens, plain.choices[0].finish_reason) == (12, "length")
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + 12
    assert plain.usage.prompt_tokens > 5
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) > 1  # token by token, not one lump
    assert "".join(deltas) == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert (chunks[-1].choices, chunks[-1].usage) == ([], plain.usage)


def test_models_and_health_name_the_served_model(llama_server: RunningServer) -> None:
    assert [model.id for model in openai_client(llama_server).models.list()] == [
        "tiny-llama",
        "local",
    ]  # the backend's name too
    health = httpx.get(f"{llama_server.url}/health")
    assert (health.status_code, health.json()["status"], health.json()["backend"]) == (200, "ok", "local")


def test_a_missing_model_name_is_accepted_and_an_unknown_one_is_404(llama_server: RunningServer) -> None:
    body = {"messages": CHAT, "max_tokens": 2}
    assert httpx.post(f"{llama_server.url}/v1/chat/completions", json=body).status_code == 200
    by_backend = openai_client(llama_server).chat.completions.create(model="local", messages=CHAT, max_tokens=2)
    assert by_backend.model == "tiny-llama"  # asked by the backend's name, answered under the served name
    with pytest.raises(openai.NotFoundError) as caught:
        openai_client(llama_server).chat.completions.create(model="gpt-4o", messages=CHAT)
    assert (caught.value.code, caught.value.param) == ("model_not_found", "model")


async def test_a_prompt_too_long_is_a_400_even_when_streaming(llama_server: RunningServer) -> None:
    long_chat: list[ChatCompletionMessageParam] = [{"role": "user", "content": "what is the total ? " * 80}]
    llm = AsyncOpenAI(base_url=llama_server.base_url, api_key="x", max_retries=0)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            await llm.chat.completions.create(model="tiny-llama", messages=long_chat, stream=stream)
        assert caught.value.code == "reasoning_rejected"
    await llm.close()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": CHAT, "n": 2}, "n"),
        ({"messages": [{"role": "tool", "content": "42"}]}, "messages.0.role"),
        ({"messages": []}, "messages"),
        ({"messages": CHAT, "max_tokens": 0}, "max_tokens"),
        ({"messages": image_message("what is it?", data_url(png_bytes()))}, "messages.0.content"),
    ],
    ids=["n=2", "unknown-role", "no-messages", "zero-budget", "image-part"],
)
def test_malformed_requests_are_400_naming_the_field(llama_server: RunningServer, body: Any, param: str) -> None:
    response = httpx.post(f"{llama_server.url}/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["type"]) == (param, "invalid_request_error")
    assert error["code"] in ("invalid_request", "image_not_supported")


def test_a_body_that_is_not_json_is_400(llama_server: RunningServer) -> None:
    response = httpx.post(
        f"{llama_server.url}/v1/chat/completions",
        content=b'{"messages": [',
        headers={"content-type": "application/json"},
    )
    assert (response.status_code, response.json()["error"]["code"]) == (400, "invalid_json")


# -- the reasoning server over fakes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "code", "retry_after"),
    [
        (reasoning_errors.ReasoningUnavailable("busy", retry_after_s=7), 503, "reasoning_unavailable", "7"),
        (reasoning_errors.ReasoningUnavailable("down"), 503, "reasoning_unavailable", "5"),
        (reasoning_errors.ReasoningDisabled("none"), 503, "reasoning_disabled", None),
        (reasoning_errors.ReasoningRejected("too long"), 400, "reasoning_rejected", None),
        (reasoning_errors.ReasoningInvalidOutput("garbage"), 502, "reasoning_invalid_output", None),
        (reasoning_errors.ReasoningModelError("gone"), 503, "reasoning_model_error", None),
        (RuntimeError("bug"), 500, "internal_error", None),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else None,
)
def test_backend_errors_map_to_statuses(
    fake_reasoning: tuple[StreamingFake, RunningServer],
    error: Exception,
    status: int,
    code: str,
    retry_after: str | None,
) -> None:
    reasoning, server = fake_reasoning
    reasoning.error = error  # type: ignore[assignment]
    reasoning.fail_with = error  # streaming fails before its first delta
    for stream in (False, True):
        body = {"model": "fake-llm", "messages": CHAT, "stream": stream}
        response = httpx.post(f"{server.url}/v1/chat/completions", json=body)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code)
        assert response.headers.get("retry-after") == retry_after
        if status < 500:
            assert str(error) in response.json()["error"]["message"]


def test_a_failure_mid_stream_is_an_error_event_then_done(fake_reasoning: tuple[StreamingFake, RunningServer]) -> None:
    reasoning, server = fake_reasoning
    reasoning.deltas = (ReasoningDelta(text="The total"), ReasoningDelta(text=" is"))
    reasoning.fail_with = reasoning_errors.ReasoningUnavailable("the GPU fell over")
    body = {"model": "fake-llm", "messages": CHAT, "stream": True}
    events = sse_events(httpx.post(f"{server.url}/v1/chat/completions", json=body))
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "reasoning_unavailable"
    assert [json.loads(e)["choices"][0]["delta"].get("content") for e in events[1:3]] == ["The total", " is"]

    seen: list[str] = []

    def read_stream() -> None:
        for chunk in openai_client(server).chat.completions.create(model="fake-llm", messages=CHAT, stream=True):
            seen.append(chunk.choices[0].delta.content or "")

    with pytest.raises(openai.APIError, match="the GPU fell over") as caught:
        read_stream()
    assert (caught.value.code, "".join(seen)) == ("reasoning_unavailable", "The total is")


def test_a_stream_that_ends_without_finishing_is_not_passed_off_as_complete(
    fake_reasoning: tuple[StreamingFake, RunningServer],
) -> None:
    reasoning, server = fake_reasoning
    reasoning.deltas = (ReasoningDelta(text="The total"),)
    events = sse_events(
        httpx.post(f"{server.url}/v1/chat/completions", json={"messages": CHAT, "stream": True}, timeout=10)
    )
    assert (json.loads(events[-2])["error"]["code"], events[-1]) == ("incomplete_stream", "[DONE]")


def test_a_client_that_goes_away_closes_the_backend_stream(
    fake_reasoning: tuple[StreamingFake, RunningServer],
) -> None:
    reasoning, server = fake_reasoning
    reasoning.deltas, reasoning.hang = (ReasoningDelta(text="The total"),), True
    body = {"messages": CHAT, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=10) as response:
        assert response.status_code == 200
        next(response.iter_lines())
    assert reasoning.stream_closed.wait(timeout=5)


def test_thinking_is_reasoning_content_and_a_plain_backend_streams_in_one_delta() -> None:
    @dataclass
    class Thinker(FakeReasoning):
        async def generate(self, request: ReasoningRequest) -> Any:
            return dataclasses.replace(await super().generate(request), thinking="add the lines up")

    with serving(reasoning_server.create_app(Thinker(), served_model_name="thinker")) as server:
        llm = openai_client(server)
        message = llm.chat.completions.create(model="thinker", messages=CHAT).choices[0].message
        chunks = list(llm.chat.completions.create(model="thinker", messages=CHAT, stream=True))
    assert (message.content, getattr(message, "reasoning_content", None)) == ("The total is 54.06.", "add the lines up")
    deltas = [chunk.choices[0].delta for chunk in chunks]
    assert [getattr(d, "reasoning_content", None) for d in deltas if getattr(d, "reasoning_content", None)] == [
        "add the lines up"
    ]
    assert [d.content for d in deltas if d.content] == ["The total is 54.06."]


def test_a_body_over_the_limit_is_413() -> None:
    app = reasoning_server.create_app(FakeReasoning(), served_model_name="m", max_body_bytes=2_000)
    with serving(app) as server:
        huge = {"messages": [{"role": "user", "content": "x" * 5_000}]}
        declared = httpx.post(f"{server.url}/v1/chat/completions", json=huge)
        chunked = httpx.post(f"{server.url}/v1/chat/completions", content=iter([json.dumps(huge).encode()]))
    for response in (declared, chunked):
        assert (response.status_code, response.json()["error"]["code"]) == (413, "request_too_large")


# -- the embedded SmolLM2 (real weights) -------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_embedded_model_streams_what_it_answers(embedded_model_cache: Path) -> None:
    backend = asyncio.run(LocalReasoningBackend.load(None, cache_dir=embedded_model_cache))
    chat: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "A receipt says: TOTAL 54.06. What is the total? Answer with the number."}
    ]
    with serving(reasoning_server.create_app(backend, served_model_name="smollm2")) as server:
        llm = openai_client(server)
        plain = llm.chat.completions.create(model="smollm2", messages=chat, max_tokens=24)
        streamed = llm.chat.completions.create(model="smollm2", messages=chat, max_tokens=24, stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text == plain.choices[0].message.content
    assert "54.06" in text
