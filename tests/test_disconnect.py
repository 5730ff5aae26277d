"""Work for a client that has gone stops (`orchestrator.api.disconnect`), and a closed generation never outlives the
model's lock (`reasoning_stage.local`). Over a real server on loopback: a client that gives up on a non-streamed
request has its generation cancelled, so the next request is not queued behind abandoned work."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from orchestrator.api.app import create_app
from orchestrator.api.disconnect import DisconnectMiddleware
from orchestrator.observability.record import RequestRecord
from orchestrator.settings import AuditSettings, CacheSettings, RouterSettings, Settings
from orchestrator.wiring import Backends
from reasoning_stage.local import _settle
from reasoning_stage.types import ReasoningDelta, ReasoningRequest, ReasoningResult
from tests.fakes import FakeReasoning, FakeStreamingReasoning, FakeVision
from tests.images import png_bytes
from tests.servers import RunningServer, serving

BODY = {"image_base64": base64.b64encode(png_bytes()).decode(), "question": "Why is it 54.06?", "mode": "reasoning"}


@dataclass
class OneAtATime(FakeReasoning):
    """Holds a lock while it answers, as an in-process model does; the first call hangs until it is cancelled."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    hang_first: bool = True
    cancelled: int = 0

    async def generate(self, request: ReasoningRequest) -> ReasoningResult:
        async with self.lock:
            if self.hang_first:
                self.hang_first = False
                try:
                    await asyncio.sleep(60)
                except asyncio.CancelledError:
                    self.cancelled += 1
                    raise
            return await super().generate(request)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[RunningServer, OneAtATime, Path]]:
    reasoning = OneAtATime()
    audit = tmp_path / "audit.jsonl"
    settings = Settings(
        router=RouterSettings(kind="keyword"), cache=CacheSettings(enabled=False), audit=AuditSettings(path=audit)
    )
    with serving(create_app(settings, Backends(FakeVision(), reasoning))) as server:
        yield server, reasoning, audit


def test_a_client_that_gives_up_has_its_work_cancelled_and_the_next_one_is_served(
    live: tuple[RunningServer, OneAtATime, Path],
) -> None:
    server, reasoning, audit = live
    with pytest.raises(httpx.ReadTimeout):  # the client gives up, as the openai SDK does after its timeout
        httpx.post(f"{server.url}/v1/analyze", json=BODY, timeout=1.0)
    deadline = time.monotonic() + 10
    while not reasoning.cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reasoning.cancelled == 1, "the abandoned generation was not cancelled"

    started = time.monotonic()
    answered = httpx.post(f"{server.url}/v1/analyze", json=BODY, timeout=10.0)
    assert answered.status_code == 200
    assert answered.json()["reasoning"]["answer"] == "The total is 54.06."
    assert time.monotonic() - started < 5, "the next request waited behind abandoned work"

    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [record["status"] for record in records] == [499, 200]  # the gone client's request is audited too


async def test_a_closed_generation_is_awaited_even_when_its_closer_is_cancelled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The model's lock must not be released while the generation thread still runs, and the thread's exception
    is retrieved (no "Task exception was never retrieved")."""
    release = asyncio.Event()

    async def generation() -> None:
        await release.wait()
        raise RuntimeError("stopped: the caller went away")

    worker = asyncio.create_task(generation())
    closer = asyncio.create_task(_settle(worker))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    closer.cancel()  # the closer is cancelled while it waits
    await asyncio.sleep(0.01)
    assert not closer.done(), "it stopped waiting for the generation"
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await closer  # the cancellation is raised once the generation has ended
    assert worker.done()
    del worker
    gc.collect()
    assert "never retrieved" not in caplog.text


@dataclass
class Words(FakeStreamingReasoning):
    """Streams a word every 0.1 s for 10 s; counts streams closed before their end."""

    cancelled: int = 0

    async def stream(self, request: ReasoningRequest) -> AsyncGenerator[ReasoningDelta, None]:
        self.requests.append(request)
        try:
            for index in range(100):
                yield ReasoningDelta(text=f" word{index}")
                await asyncio.sleep(0.1)
        except (GeneratorExit, asyncio.CancelledError):
            self.cancelled += 1
            raise
        yield ReasoningDelta(finish_reason="stop")


def test_a_streamed_request_whose_client_leaves_is_stopped_and_audited_as_499(tmp_path: Path) -> None:
    reasoning, audit = Words(), tmp_path / "audit.jsonl"
    settings = Settings(
        router=RouterSettings(kind="keyword"), cache=CacheSettings(enabled=False), audit=AuditSettings(path=audit)
    )
    with serving(create_app(settings, Backends(FakeVision(), reasoning))) as server:
        with httpx.stream("POST", f"{server.url}/v1/analyze", json={**BODY, "stream": True}, timeout=10) as response:
            received = b""
            for chunk in response.iter_bytes():
                received += chunk
                if b"word3" in received:
                    break  # the client leaves mid-answer
        deadline = time.monotonic() + 10
        while not audit.exists() or not audit.read_text().strip():
            assert time.monotonic() < deadline, "the request was not audited"
            time.sleep(0.05)
        metrics = httpx.get(f"{server.url}/metrics").text.splitlines()
        in_flight = [line for line in metrics if line.startswith("orchestrator_requests_in_flight ")]
    assert reasoning.cancelled == 1
    [record] = [json.loads(line) for line in audit.read_text().splitlines()]
    assert (record["status"], record["error"]) == (499, "client_disconnected")
    assert in_flight == ["orchestrator_requests_in_flight 0.0"]


@pytest.mark.parametrize("handler_does", ["reraise", "swallow", "raise-other"])
async def test_the_middleware_takes_back_its_own_cancellation_whatever_the_handler_does(handler_does: str) -> None:
    """The handler runs in the request's own task, which the middleware cancels when the client goes: the request is
    recorded as 499 and the task is left with no cancellation pending, so later code in it is not cancelled."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # the whole body: the middleware starts listening
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            await asyncio.sleep(10)  # the client disconnects meanwhile
        except asyncio.CancelledError:
            if handler_does == "raise-other":
                raise RuntimeError("cleanup failed while cancelled") from None
            if handler_does == "reraise":
                raise

    messages: list[Message] = [{"type": "http.request", "body": b"{}", "more_body": False}]
    gone = asyncio.Event()

    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        pass

    scope: Scope = {"type": "http", "path": "/v1/analyze", "method": "POST", "headers": [], "state": {}}

    async def request() -> tuple[int | None, int]:
        asyncio.get_running_loop().call_later(0.05, gone.set)
        await DisconnectMiddleware(app)(scope, receive, send)
        task = asyncio.current_task()
        assert task is not None
        await asyncio.sleep(0)  # a pending cancellation would strike here
        return RequestRecord.of(scope).status, task.cancelling()

    assert await asyncio.wait_for(asyncio.create_task(request()), 5) == (499, 0)
