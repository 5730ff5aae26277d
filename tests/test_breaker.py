"""The circuit breaker on its own (`orchestrator/stages/breaker.py`): opening on consecutive failures or on a failure
rate, its single half-open trial, and what a cancelled trial frees."""

from __future__ import annotations

import pytest

from orchestrator.stage_settings import BreakerSettings
from orchestrator.stages.breaker import BreakerState, CircuitBreaker, Permit
from tests.fakes import Clock


def state_of(breaker: CircuitBreaker) -> BreakerState:
    """The breaker's state, read afresh (the type checker would keep an earlier assertion's narrowing)."""
    return breaker.state


def test_a_breaker_opens_after_enough_failures_and_a_single_trial_closes_it() -> None:
    clock = Clock()
    changes: list[tuple[BreakerState, BreakerState]] = []
    breaker = CircuitBreaker(
        BreakerSettings(failures=3, window_s=10, open_s=5), clock=clock, on_change=lambda a, b: changes.append((a, b))
    )
    for _ in range(3):
        permit = breaker.acquire()
        assert permit == Permit(trial=False)
        breaker.record(permit, ok=False)
    assert state_of(breaker) == BreakerState.OPEN
    assert breaker.acquire() is None
    assert breaker.retry_in() == pytest.approx(5.0)
    clock.now += 5.0
    trial = breaker.acquire()
    assert trial == Permit(trial=True)
    assert state_of(breaker) == BreakerState.HALF_OPEN
    assert breaker.acquire() is None  # one trial at a time
    breaker.record(trial, ok=True)
    assert changes == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]


def test_a_failed_trial_reopens_and_a_cancelled_one_frees_its_place() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerSettings(failures=1, open_s=5), clock=clock)
    breaker.record(Permit(trial=False), ok=False)
    clock.now += 5.0
    trial = breaker.acquire()
    assert trial is not None
    breaker.abandon(trial)
    again = breaker.acquire()
    assert again == Permit(trial=True)
    breaker.record(again, ok=False)
    assert state_of(breaker) == BreakerState.OPEN
    assert breaker.retry_in() == pytest.approx(5.0)


def test_a_breaker_opens_on_the_failure_rate_over_enough_calls_and_forgets_old_failures() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerSettings(failures=100, failure_rate=0.5, min_calls=4, window_s=10), clock=clock)
    for ok in (False, True, False):
        breaker.record(Permit(trial=False), ok=ok)
    assert state_of(breaker) == BreakerState.CLOSED  # 3 calls: fewer than min_calls
    breaker.record(Permit(trial=False), ok=False)
    assert state_of(breaker) == BreakerState.OPEN

    forgetful = CircuitBreaker(BreakerSettings(failures=2, window_s=10), clock=clock)
    forgetful.record(Permit(trial=False), ok=False)
    clock.now += 11.0
    forgetful.record(Permit(trial=False), ok=False)
    assert state_of(forgetful) == BreakerState.CLOSED
