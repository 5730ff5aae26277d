"""The resilience layer's parts, each on its own: retries and their budget, admission, endpoint choice, deadlines, and
the stream rule (retry only before the first item); the circuit breaker alone is in `test_breaker.py`."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import cast

import pytest

from orchestrator.stage_settings import AdmissionSettings, BreakerSettings, PolicySettings, RetrySettings
from orchestrator.stages import deadline
from orchestrator.stages.admission import BULK
from orchestrator.stages.breaker import BreakerState, CircuitBreaker, Permit
from orchestrator.stages.endpoints import Endpoint, ResilientStage
from orchestrator.stages.resilient import REASONING_ERRORS, VISION_ERRORS, FallbackVision, ResilientVision
from orchestrator.stages.retry import RetryBudget, backoff_s, is_retryable
from reasoning_stage.errors import ReasoningUnavailable
from tests.fakes import Clock, FakeVision
from tests.images import decoded
from tests.raw_http import eventually
from vision_stage.backend import VisionBackend
from vision_stage.errors import (
    ImageCorrupt,
    VisionInvalidOutput,
    VisionOverloaded,
    VisionRejected,
    VisionUnavailable,
)
from vision_stage.types import VisionRequest

FAST_RETRY = RetrySettings(attempts=3, backoff_s=0.001, backoff_max_s=0.002)


@dataclass
class Scripted:
    """A backend whose calls follow `script`: an exception to raise, or a value to return; records each call."""

    label: str
    script: list[object]
    calls: int = 0
    delay_s: float = 0.0
    seen: list[str] = field(default_factory=list)

    async def run(self) -> str:
        self.calls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        step = self.script.pop(0) if self.script else "ok"
        if isinstance(step, BaseException):
            raise step
        return f"{step} from {self.label}"


def state_of(breaker: CircuitBreaker) -> BreakerState:
    """The breaker's state, read afresh (the type checker would keep an earlier assertion's narrowing)."""
    return breaker.state


def stage_of(*backends: Scripted, **overrides: object) -> ResilientStage[Scripted]:
    settings = PolicySettings(retry=FAST_RETRY, **overrides)
    return ResilientStage(VISION_ERRORS, [(b.label, b) for b in backends], settings, rng=random.Random(0))


async def run_on(stage: ResilientStage[Scripted]) -> str:
    return await stage.call(lambda endpoint: endpoint.backend.run())


# --- retries ---------------------------------------------------------------------------------------------------


def test_only_failures_that_say_not_now_are_retryable() -> None:
    assert is_retryable(VisionUnavailable("down"))
    assert not is_retryable(VisionUnavailable("cut mid-answer", retryable=False))
    assert not is_retryable(VisionRejected("bad request"))
    assert not is_retryable(VisionInvalidOutput("garbage"))
    assert not is_retryable(RuntimeError("ours"))


def test_backoff_is_jittered_exponential_and_honours_retry_after() -> None:
    settings = RetrySettings(backoff_s=0.1, backoff_max_s=0.3)
    rng = random.Random(1)
    waits = [backoff_s(settings, attempt, None, rng) for attempt in (1, 2, 3, 4) for _ in range(50)]
    assert all(0.0 <= wait <= 0.3 for wait in waits)
    assert max(waits[:50]) <= 0.1 < max(waits[100:])
    assert backoff_s(settings, 1, 2.5, rng) == 2.5


def test_the_retry_budget_caps_retries_at_a_share_of_calls_plus_a_floor() -> None:
    clock = Clock()
    budget = RetryBudget(RetrySettings(budget_ratio=0.5, budget_per_s=0.1), clock=clock)  # floor: 1 per 10 s
    for _ in range(10):
        budget.record_call()
    granted = sum(budget.try_spend() for _ in range(20))
    assert granted == 6  # 0.5 × 10 calls + 0.1/s × 10 s
    clock.now += 11.0
    assert budget.try_spend()  # the window moved on


async def test_a_retryable_failure_is_retried_on_another_endpoint_and_the_error_names_each_attempt() -> None:
    a = Scripted("http://a/v1", [VisionUnavailable("a is down")])
    b = Scripted("http://b/v1", [VisionUnavailable("b is down")])
    stage = stage_of(a, b)
    assert await run_on(stage) in {"ok from http://a/v1", "ok from http://b/v1"}
    assert a.calls + b.calls == 3 or (a.calls, b.calls) in {(2, 1), (1, 2)}

    c = Scripted("http://c/v1", [VisionUnavailable("c is down")] * 3)
    with pytest.raises(VisionUnavailable) as raised:
        await run_on(stage_of(c))
    message = str(raised.value)
    assert "vision stage, attempt 3 of at most 3" in message
    assert "#1 http://c/v1: VisionUnavailable: c is down" in message
    assert [f.attempt for f in raised.value.attempts] == [1, 2, 3]  # type: ignore[attr-defined]


async def test_a_call_cancelled_in_its_first_attempt_leaves_no_slot_load_or_trial_behind() -> None:
    clock = Clock()
    slow = Scripted("a", ["ok"], delay_s=30.0)
    settings = PolicySettings(retry=FAST_RETRY, breaker=BreakerSettings(failures=1, open_s=5))
    stage = ResilientStage(VISION_ERRORS, [("a", slow)], settings, clock=clock, rng=random.Random(0))
    breaker = stage.endpoints[0].breaker
    breaker.record(Permit(trial=False), ok=False)
    clock.now += 5.0  # half-open: the call's first attempt is the trial
    call = asyncio.create_task(run_on(stage))
    await eventually(lambda: slow.calls == 1, timeout_s=10)
    assert (stage.admission.in_flight, stage.endpoints[0].in_flight) == (1, 1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert (stage.admission.in_flight, stage.endpoints[0].in_flight) == (0, 0)
    assert breaker.acquire() == Permit(trial=True)  # the cancelled trial gave its place back


async def test_a_refusal_or_garbage_is_not_retried_and_only_garbage_counts_against_the_endpoint() -> None:
    refused = Scripted("http://a/v1", [VisionRejected("too long")])
    stage = stage_of(refused)
    with pytest.raises(VisionRejected):
        await run_on(stage)
    assert refused.calls == 1
    garbage = Scripted("http://b/v1", [VisionInvalidOutput("not JSON")])
    with pytest.raises(VisionInvalidOutput):
        await run_on(stage_of(garbage, breaker=BreakerSettings(failures=1)))
    assert garbage.calls == 1
    refusing = stage_of(Scripted("http://c/v1", [VisionRejected("no")]), breaker=BreakerSettings(failures=1))
    with pytest.raises(VisionRejected):
        await run_on(refusing)
    assert refusing.endpoints[0].breaker.state == BreakerState.CLOSED


async def test_retry_after_beyond_the_deadline_ends_the_call_at_once() -> None:
    slow_down = Scripted("http://a/v1", [VisionUnavailable("429", retry_after_s=30.0)])
    stage = stage_of(slow_down)
    started = time.monotonic()
    with deadline.request_deadline(2.0), pytest.raises(VisionUnavailable):
        await run_on(stage)
    assert slow_down.calls == 1
    assert time.monotonic() - started < 1.0


async def test_an_attempt_is_bounded_by_the_request_deadline() -> None:
    hung = Scripted("http://a/v1", [], delay_s=30.0)
    started = time.monotonic()
    with deadline.request_deadline(0.3), pytest.raises(VisionUnavailable) as raised:
        await run_on(stage_of(hung))
    assert time.monotonic() - started < 2.0
    assert "the request's deadline passed" in str(raised.value)
    assert not raised.value.retryable


# --- endpoints and breakers together ---------------------------------------------------------------------------


async def test_an_endpoint_whose_breaker_opened_is_left_out_until_its_trial() -> None:
    clock = Clock()
    a = Scripted("http://a/v1", [VisionUnavailable("down")] * 2)
    b = Scripted("http://b/v1", [])
    settings = PolicySettings(retry=RetrySettings(attempts=1), breaker=BreakerSettings(failures=2, open_s=30))
    stage = ResilientStage(VISION_ERRORS, [(a.label, a), (b.label, b)], settings, clock=clock)
    results = []
    for _ in range(6):
        try:
            results.append(await run_on(stage))
        except VisionUnavailable:
            results.append("failed")
    assert results.count("failed") == 2
    assert a.calls == 2  # then ejected: b took the rest
    assert stage.endpoints[0].breaker.state == BreakerState.OPEN
    assert [s.breaker for s in stage.statuses()] == [BreakerState.OPEN, BreakerState.CLOSED]
    clock.now += 30.0
    after = [await run_on(stage) for _ in range(4)]
    assert after[0] == "ok from http://a/v1"  # the trial goes first, and closes the breaker
    assert after[1:] == ["ok from http://b/v1", "ok from http://a/v1", "ok from http://b/v1"]  # then they take turns
    assert stage.statuses()[0].breaker == BreakerState.CLOSED


async def test_an_image_found_broken_mid_call_is_no_verdict_on_the_endpoint_not_even_a_trial() -> None:
    clock = Clock()
    a = Scripted("http://a/v1", [VisionUnavailable("down"), ImageCorrupt("broken pixels"), ImageCorrupt("again")])
    settings = PolicySettings(retry=RetrySettings(attempts=1), breaker=BreakerSettings(failures=1, open_s=30))
    stage = ResilientStage(VISION_ERRORS, [(a.label, a)], settings, clock=clock)
    with pytest.raises(VisionUnavailable):
        await run_on(stage)
    assert state_of(stage.endpoints[0].breaker) == BreakerState.OPEN
    clock.now += 30.0
    with pytest.raises(ImageCorrupt):  # the trial's call: the request's own fault, the endpoint's health unknown
        await run_on(stage)
    assert state_of(stage.endpoints[0].breaker) != BreakerState.CLOSED
    with pytest.raises(ImageCorrupt):  # the next call gets the trial
        await run_on(stage)
    assert a.calls == 3
    assert await run_on(stage) == "ok from http://a/v1"
    assert state_of(stage.endpoints[0].breaker) == BreakerState.CLOSED


async def test_with_every_breaker_open_a_call_fails_fast_with_the_soonest_trial() -> None:
    a = Scripted("http://a/v1", [VisionUnavailable("down")])
    settings = PolicySettings(retry=RetrySettings(attempts=1), breaker=BreakerSettings(failures=1, open_s=20))
    stage = ResilientStage(VISION_ERRORS, [(a.label, a)], settings)
    with pytest.raises(VisionUnavailable):
        await run_on(stage)
    with pytest.raises(VisionUnavailable) as raised:
        await run_on(stage)
    assert a.calls == 1
    assert "every circuit breaker is open" in str(raised.value)
    assert raised.value.retry_after_s is not None
    assert 19.0 <= raised.value.retry_after_s <= 20.0


async def test_a_half_open_trial_is_bounded_by_its_own_timeout() -> None:
    clock = Clock()
    a = Scripted("http://a/v1", [VisionUnavailable("down")])
    settings = PolicySettings(
        retry=RetrySettings(attempts=1), breaker=BreakerSettings(failures=1, open_s=5, trial_timeout_s=0.2)
    )
    stage = ResilientStage(VISION_ERRORS, [(a.label, a)], settings, clock=clock)
    with pytest.raises(VisionUnavailable):
        await run_on(stage)
    clock.now += 5.0
    a.delay_s = 30.0
    started = time.monotonic()
    with pytest.raises(VisionUnavailable) as raised:
        await run_on(stage)
    assert time.monotonic() - started < 2.0
    assert "half-open trial took longer than 0.2 s" in str(raised.value)
    assert stage.endpoints[0].breaker.state == BreakerState.OPEN


async def test_load_goes_to_the_endpoint_with_the_fewest_calls_in_flight() -> None:
    a = Scripted("http://a/v1", [], delay_s=0.05)
    b = Scripted("http://b/v1", [], delay_s=0.05)
    stage = stage_of(a, b)
    await asyncio.gather(*(run_on(stage) for _ in range(10)))
    assert (a.calls, b.calls) == (5, 5)


# --- admission ---------------------------------------------------------------------------------------------------


async def test_beyond_the_in_flight_and_queue_bounds_a_call_is_refused_at_once() -> None:
    slow = Scripted("http://a/v1", [], delay_s=0.3)
    stage = stage_of(slow, admission=AdmissionSettings(max_in_flight=2, max_queue=1))
    calls = [asyncio.create_task(run_on(stage)) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert (stage.admission.in_flight, stage.admission.waiting) == (2, 1)
    started = time.monotonic()
    with pytest.raises(VisionOverloaded) as raised:
        await run_on(stage)
    assert time.monotonic() - started < 0.1
    assert raised.value.retry_after_s == 1.0
    assert "2 calls in flight and 1 waiting" in str(raised.value)
    assert len(await asyncio.gather(*calls)) == 3  # the admitted ones all finish
    assert slow.calls == 3


async def test_a_queued_call_gives_up_when_the_deadline_leaves_no_time_to_wait() -> None:
    slow = Scripted("http://a/v1", [], delay_s=1.0)
    stage = stage_of(slow, admission=AdmissionSettings(max_in_flight=1, max_queue=5))
    first = asyncio.create_task(run_on(stage))
    await asyncio.sleep(0.05)
    with deadline.request_deadline(0.2), pytest.raises(VisionOverloaded, match="deadline passed while it waited"):
        await run_on(stage)
    await first


async def test_bulk_work_leaves_a_quarter_of_the_slots_to_interactive_calls() -> None:
    slow = Scripted("http://a/v1", [], delay_s=0.3)
    stage = stage_of(slow, admission=AdmissionSettings(max_in_flight=4, max_queue=20))
    assert stage.admission.bulk_share == 3

    async def bulk() -> str:
        token = BULK.set(True)
        try:
            return await run_on(stage)
        finally:
            BULK.reset(token)

    batch = [asyncio.create_task(bulk()) for _ in range(8)]
    await asyncio.sleep(0.05)
    admission = stage.admission
    assert (admission.in_flight, admission.bulk_waiting, admission.waiting) == (3, 5, 0)  # bulk holds 3 of 4
    started = time.monotonic()
    await run_on(stage)  # an interactive call takes the fourth at once
    assert time.monotonic() - started < 0.45
    assert len(await asyncio.gather(*batch)) == 8


# --- streams -----------------------------------------------------------------------------------------------------


@dataclass
class StreamScript:
    label: str
    fail_before: int = 0
    """Fail this many times before the first item."""
    fail_after_first: bool = False
    opened: int = 0

    async def items(self) -> AsyncIterator[str]:
        self.opened += 1
        if self.opened <= self.fail_before:
            raise ReasoningUnavailable(f"{self.label} refused")
        yield "first"
        if self.fail_after_first:
            raise ReasoningUnavailable(f"{self.label} cut off", retryable=False)
        yield "second"


async def test_a_stream_is_retried_before_its_first_item_and_never_after() -> None:
    flaky = StreamScript("http://a/v1", fail_before=2)
    stage: ResilientStage[StreamScript] = ResilientStage(
        REASONING_ERRORS, [(flaky.label, flaky)], PolicySettings(retry=FAST_RETRY)
    )
    assert [item async for item in stage.stream(lambda backend: backend.items())] == ["first", "second"]
    assert flaky.opened == 3

    cut = StreamScript("http://b/v1", fail_after_first=True)
    cutting: ResilientStage[StreamScript] = ResilientStage(
        REASONING_ERRORS, [(cut.label, cut)], PolicySettings(retry=FAST_RETRY, breaker=BreakerSettings(failures=1))
    )
    received: list[str] = []

    async def consume() -> None:
        async for item in cutting.stream(lambda backend: backend.items()):
            received.append(item)

    with pytest.raises(ReasoningUnavailable, match="cut off"):
        await consume()
    assert received == ["first"]
    assert cut.opened == 1
    assert cutting.endpoints[0].breaker.state == BreakerState.OPEN
    assert cutting.endpoints[0].in_flight == 0


# --- the vision fallback chain -----------------------------------------------------------------------------------


async def test_the_fallback_answers_when_the_primary_cannot_and_says_why() -> None:
    class Down(FakeVision):
        async def generate(self, request: VisionRequest) -> object:  # type: ignore[override]
            raise VisionUnavailable("the remote vision backend (http://a/v1) could not be reached")

    settings = PolicySettings(retry=RetrySettings(attempts=1))
    primary = ResilientVision([("http://a/v1", cast(VisionBackend, Down()))], settings)
    chain = FallbackVision(primary, ResilientVision([("ocr", FakeVision())], settings))
    result = await chain.generate(VisionRequest(decoded(), "What is the total?", task="answer"))
    assert result.fallback is not None
    assert (result.fallback.backend, result.fallback.error_type) == ("fake", "VisionUnavailable")
    assert "could not be reached" in result.fallback.message
    assert result.backend == "fake"

    class Refusing(FakeVision):
        async def generate(self, request: VisionRequest) -> object:  # type: ignore[override]
            raise VisionRejected("prompt too long")

    refusing = FallbackVision(
        ResilientVision([("http://a/v1", cast(VisionBackend, Refusing()))], settings), FakeVision()
    )
    with pytest.raises(VisionRejected):  # the request's fault: the fallback would refuse it too
        await refusing.generate(VisionRequest(decoded(), "What is the total?", task="answer"))


def test_endpoint_status_reports_breaker_and_load() -> None:
    endpoint = Endpoint("http://a/v1", object(), CircuitBreaker(BreakerSettings()))
    status = endpoint.status()
    assert (status.endpoint, status.breaker, status.in_flight) == ("http://a/v1", BreakerState.CLOSED, 0)
