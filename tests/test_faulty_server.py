"""Both remote stage clients against `tests.faulty_server` on loopback: every way the server fails ends, within a
bound, in the error the client's module docstring promises (`vision_stage.remote`, `reasoning_stage.remote`)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest

from reasoning_stage.errors import ReasoningInvalidOutput, ReasoningRejected, ReasoningUnavailable
from reasoning_stage.remote import RemoteReasoningBackend
from reasoning_stage.types import ChatMessage, ReasoningRequest
from tests.faulty_server import (
    CAPTION,
    REASONING_ANSWER,
    VISION_ANSWER,
    Faults,
    FaultyServer,
    Mode,
    refused_base_url,
    running,
)
from tests.images import decoded
from tests.servers import RunningServer
from tests.vllm_fake import check_chat_request
from vision_stage.errors import VisionInvalidOutput, VisionRejected, VisionUnavailable
from vision_stage.remote import RemoteVisionBackend
from vision_stage.types import VisionRequest, VisionResult, VisionTask

MODEL = "faulty/model-1"
TIMEOUT_S = 0.4
BOUND_S = TIMEOUT_S + 0.8
"""The longest any call may take: its timeout, plus room for a loaded 2-core machine."""
GUARD_S = 10.0
"""A call still running after this is cut here, so that a client that hangs fails its test instead of the run."""
FAULTS = Faults(trickle_delay_s=0.15, pieces=8, huge_bytes=256 * 1024 * 1024, hang_limit_s=GUARD_S)
"""A trickle of 12 events 0.15 s apart (1.8 s in all: each gap within the timeout, the whole far beyond it); a huge
body a client reading it all would need seconds for."""
CHAT = ReasoningRequest((ChatMessage("system", "Answer briefly."), ChatMessage("user", "Is it reimbursable?")))


@dataclass(frozen=True)
class Stage:
    """One remote client and the error classes its module docstring promises."""

    name: str
    ask: Callable[[str, float], Awaitable[str]]
    unavailable: type[Exception]
    invalid: type[Exception]
    rejected: type[Exception]


async def see(base_url: str, timeout_s: float, task: VisionTask) -> VisionResult:
    backend = await RemoteVisionBackend.load(base_url=base_url, model=MODEL, timeout_s=timeout_s)
    try:
        return await backend.generate(VisionRequest(decoded(), "What does the receipt say?", task=task))
    finally:
        await backend.aclose()


async def look(base_url: str, timeout_s: float) -> str:
    """The vision client's answer to a question about a small image."""
    return (await see(base_url, timeout_s, "answer")).answer or ""


async def reason(base_url: str, timeout_s: float) -> str:
    backend = await RemoteReasoningBackend.load(base_url=base_url, model=MODEL, timeout_s=timeout_s)
    try:
        result = await backend.generate(CHAT)
    finally:
        await backend.aclose()
    assert result.finish_reason == "stop"
    return result.text


VISION = Stage("vision", look, VisionUnavailable, VisionInvalidOutput, VisionRejected)
REASONING = Stage("reasoning", reason, ReasoningUnavailable, ReasoningInvalidOutput, ReasoningRejected)
STAGES = [pytest.param(VISION, id="vision"), pytest.param(REASONING, id="reasoning")]


@dataclass(frozen=True)
class Outcome:
    answer: str | None
    error: Exception | None
    seconds: float

    def failure(self) -> Exception:
        assert self.error is not None, f"the call answered {self.answer!r} instead of failing"
        return self.error


async def attempt(stage: Stage, base_url: str, timeout_s: float = TIMEOUT_S) -> Outcome:
    """One call of `stage`'s client, timed; what it raised is kept (cut at `GUARD_S`: then a `TimeoutError`)."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(GUARD_S):
            answer = await stage.ask(base_url, timeout_s)
    except Exception as exc:  # every outcome is compared by the test
        return Outcome(None, exc, time.monotonic() - started)
    return Outcome(answer, None, time.monotonic() - started)


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[FaultyServer, RunningServer]]:
    server = FaultyServer(MODEL, faults=FAULTS)
    with running(server) as live:
        yield server, live


@pytest.fixture
def server(shared: tuple[FaultyServer, RunningServer]) -> FaultyServer:
    shared[0].reset(faults=FAULTS)
    return shared[0]


@pytest.fixture
def base_url(shared: tuple[FaultyServer, RunningServer]) -> str:
    return shared[1].base_url


# --- the modes, one by one --------------------------------------------------------------------------------------------

FAILURES: list[tuple[Mode, str]] = [
    ("status_500", "unavailable"),
    ("status_503", "unavailable"),
    ("status_429", "unavailable"),
    ("hang_before_headers", "unavailable"),
    ("hang_after_headers", "unavailable"),
    ("trickle", "unavailable"),  # each gap is shorter than the timeout: only a deadline for the whole answer ends it
    ("malformed_json", "invalid"),
    ("wrong_content_type", "invalid"),
    ("truncated", "invalid"),
    ("dropped", "unavailable"),  # the connection reset mid-body
    ("huge_body", "invalid"),  # more text than max_tokens allows; reading all 256 MiB would blow the bound
]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize(("mode", "kind"), FAILURES)
async def test_every_failure_mode_raises_the_documented_error_within_the_bound(
    server: FaultyServer, base_url: str, stage: Stage, mode: Mode, kind: str
) -> None:
    server.default = mode
    outcome = await attempt(stage, base_url)

    error = outcome.failure()
    assert type(error) is getattr(stage, kind), f"{type(error).__name__}: {error}"
    assert outcome.seconds < BOUND_S
    assert base_url in str(error), "the message names the server"
    assert [(entry.mode, entry.served) for entry in server.chat_requests] == [(mode, mode)]


@pytest.mark.parametrize("stage", STAGES)
async def test_ok_streams_a_whole_answer_to_a_request_vllm_would_accept(
    server: FaultyServer, base_url: str, stage: Stage
) -> None:
    outcome = await attempt(stage, base_url)

    assert outcome.answer == (VISION_ANSWER if stage is VISION else REASONING_ANSWER), outcome.error
    [request] = server.chat_requests
    assert (request.method, request.path, request.served) == ("POST", "/v1/chat/completions", "ok")
    assert request.body is not None
    check_chat_request(request.body, MODEL)


async def test_the_default_answer_fits_each_vision_task(server: FaultyServer, base_url: str) -> None:
    described = await see(base_url, TIMEOUT_S, "describe")
    captioned = await see(base_url, TIMEOUT_S, "caption")

    assert [line.text for line in described.structured.text_lines] == ["CORNER SHOP", "Coffee 3.50", "TOTAL 3.50"]
    assert [(field.key, field.value) for field in described.structured.fields] == [("Total", "3.50")]
    assert "“TOTAL 3.50”" in described.description
    assert captioned.caption == CAPTION


async def test_an_answer_can_be_a_function_of_the_request() -> None:
    server = FaultyServer(MODEL, answer=lambda body: f"{len(body['messages'])} messages, {body['max_tokens']} tokens")
    with running(server) as live:
        answer = await reason(live.base_url, TIMEOUT_S)
    assert answer == "2 messages, 256 tokens"


async def test_reasoning_reads_the_usage_chunk(base_url: str) -> None:
    backend = await RemoteReasoningBackend.load(base_url=base_url, model=MODEL, timeout_s=TIMEOUT_S)
    try:
        result = await backend.generate(CHAT)
    finally:
        await backend.aclose()
    assert (result.finish_reason, result.completion_tokens) == ("stop", FAULTS.pieces)
    assert result.prompt_tokens > 0


@pytest.mark.parametrize(("mode", "retry_after_s"), [("status_429", 1.0), ("status_503", None), ("status_500", None)])
@pytest.mark.parametrize("stage", STAGES)
async def test_a_refusal_says_when_to_come_back_and_that_asking_again_may_help(
    server: FaultyServer, base_url: str, stage: Stage, mode: Mode, retry_after_s: float | None
) -> None:
    server.default = mode
    error = (await attempt(stage, base_url)).failure()

    assert isinstance(error, stage.unavailable)
    assert (getattr(error, "retry_after_s", "missing"), getattr(error, "retryable", "missing")) == (retry_after_s, True)


@pytest.mark.parametrize("stage", STAGES)
async def test_a_connection_dropped_mid_answer_is_not_retryable(
    server: FaultyServer, base_url: str, stage: Stage
) -> None:
    server.default = "dropped"
    error = (await attempt(stage, base_url)).failure()

    assert isinstance(error, stage.unavailable)
    assert getattr(error, "retryable", "missing") is False, "part of the answer had arrived"


@pytest.mark.parametrize("stage", STAGES)
async def test_a_model_the_server_does_not_serve_is_rejected(server: FaultyServer, base_url: str, stage: Stage) -> None:
    server.model = "another/model"
    try:
        error = (await attempt(stage, base_url)).failure()
    finally:
        server.model = MODEL
    assert isinstance(error, stage.rejected)


# --- scripts, flakiness, refused connections, shutdown ----------------------------------------------------------------


@pytest.mark.parametrize("stage", STAGES)
async def test_a_script_is_served_in_order_then_the_default(server: FaultyServer, base_url: str, stage: Stage) -> None:
    server.default = "status_500"
    server.script(["status_503", "ok"])
    outcomes = [await attempt(stage, base_url) for _ in range(3)]

    assert [type(outcome.error) for outcome in outcomes] == [stage.unavailable, type(None), stage.unavailable]
    requests = server.chat_requests
    assert [entry.served for entry in requests] == ["status_503", "ok", "status_500"]
    assert [entry.at for entry in requests] == sorted(entry.at for entry in requests)


async def test_flaky_fails_as_often_as_its_seeded_coin_says(server: FaultyServer, base_url: str) -> None:
    server.reset(default="flaky", faults=Faults(flaky_rate=0.5, seed=3))
    outcomes = [await attempt(REASONING, base_url) for _ in range(12)]

    coin = random.Random(3)
    expected = ["status_500" if coin.random() < 0.5 else "ok" for _ in range(12)]
    assert [entry.served for entry in server.chat_requests] == expected
    assert [outcome.error is not None for outcome in outcomes] == [served != "ok" for served in expected]
    assert all(isinstance(outcome.error, ReasoningUnavailable | None) for outcome in outcomes)
    assert 0 < expected.count("status_500") < 12


async def test_alternate_fails_every_other_call(server: FaultyServer, base_url: str) -> None:
    server.default = "alternate"
    outcomes = [await attempt(VISION, base_url) for _ in range(4)]

    assert [outcome.error is None for outcome in outcomes] == [False, True, False, True]
    assert server.served() == {"status_500": 2, "ok": 2}


@pytest.mark.parametrize("stage", STAGES)
async def test_a_refused_connection_is_unavailable_at_once(stage: Stage) -> None:
    outcome = await attempt(stage, refused_base_url())

    assert isinstance(outcome.failure(), stage.unavailable)
    assert outcome.seconds < BOUND_S


async def test_health_lists_the_model_and_reports_a_refused_server(base_url: str) -> None:
    backend = await RemoteVisionBackend.load(base_url=base_url, model=MODEL, timeout_s=TIMEOUT_S)
    down = await RemoteReasoningBackend.load(base_url=refused_base_url(), model=MODEL, timeout_s=TIMEOUT_S)
    try:
        up, refused = await backend.health(), await down.health()
    finally:
        await backend.aclose()
        await down.aclose()
    assert up.ok, up.detail
    assert not refused.ok
    assert "ReasoningUnavailable" in refused.detail


async def test_leaving_the_block_ends_a_hang_the_client_still_waits_on() -> None:
    server = FaultyServer(MODEL, default="hang_before_headers", faults=Faults(hang_limit_s=GUARD_S))
    with running(server) as live:
        waiting = asyncio.ensure_future(attempt(REASONING, live.base_url, timeout_s=GUARD_S))
        for _ in range(int(GUARD_S / 0.01)):
            if server.chat_requests:
                break
            await asyncio.sleep(0.01)
        leaving = time.monotonic()
    stopped_s = time.monotonic() - leaving
    outcome = await waiting

    assert stopped_s < 2.0
    assert isinstance(outcome.failure(), ReasoningUnavailable)
    assert outcome.seconds < GUARD_S / 2
