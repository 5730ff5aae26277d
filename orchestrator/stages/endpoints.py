"""One stage's endpoints behind admission control, retries, circuit breakers and the request's deadline.

    stage = ResilientStage(VISION_ERRORS, [("http://a/v1", backend_a), ("http://b/v1", backend_b)], settings)
    result = await stage.call(lambda endpoint: endpoint.backend.generate(request))

Each call takes a slot (`admission`), then makes up to `retry.attempts` attempts (tenacity drives the loop; `retry`
says which failures are retried and how long to wait). Each attempt goes to an endpoint not yet tried by this call
when there is one: first to one whose breaker is due for its half-open trial (so a recovered endpoint comes back
while others are healthy), else to the closed one with the fewest calls in flight (ties take turns). An attempt is
bounded by the request's deadline (less `reserve_s`), and a half-open breaker's trial also by `trial_timeout_s`;
a retry is made only while there is at least as much time left before that bound as the failed attempt took: a
fast failure (a refused connection, a 503) is retried, but a hang that ran into a timeout is not repeated when the
repeat could not run as long.
A failure that is the endpoint's fault (unavailable, garbage) counts against its breaker; a refusal of the request
does not. When every breaker is open the call fails at once, with `retry_after_s` set to the soonest trial.

The error that ends a call is the last attempt's, its message extended with the stage, the attempt number and the
earlier attempts, and `attempts` set to every `AttemptFailure`: each failure names the stage, the backend and the
attempt.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from batch_engine.types import EngineStats
from orchestrator.stage_settings import PolicySettings
from orchestrator.stages import deadline
from orchestrator.stages.admission import Admission
from orchestrator.stages.breaker import BreakerState, CircuitBreaker, Permit
from orchestrator.stages.retry import RetryBudget, backoff_s, is_retryable

B = TypeVar("B")
T = TypeVar("T")
D = TypeVar("D")


class Unavailable(Protocol):
    def __call__(self, message: str, *, retry_after_s: float | None = ..., retryable: bool = ...) -> Exception: ...


@dataclass(frozen=True)
class StageErrors:
    """How one stage's errors are built and told apart."""

    stage: str
    unavailable: Unavailable
    endpoint_faults: tuple[type[Exception], ...]
    """Failures that count against an endpoint's breaker (it is down, slow, or answering garbage)."""
    overloaded: Callable[[str, float], Exception]
    caller_faults: tuple[type[Exception], ...] = ()
    """Failures that are the request's own, found only once the call began (an image whose pixels do not decode):
    no verdict on the endpoint, not even a trial's."""


@dataclass(frozen=True)
class AttemptFailure:
    stage: str
    endpoint: str
    attempt: int
    error_type: str
    message: str
    seconds: float = 0.0
    """How long the attempt ran before it failed."""


@dataclass(frozen=True)
class EndpointStatus:
    """What `/ready` shows of one endpoint."""

    endpoint: str
    breaker: BreakerState
    retry_in_s: float
    in_flight: int
    engine: EngineStats | None = None
    """The in-process batching engine's counters, for a backend that has one (`glm`; `/metrics` only)."""


class Endpoint(Generic[B]):
    def __init__(self, label: str, backend: B, breaker: CircuitBreaker) -> None:
        self.label = label
        self.backend = backend
        self.breaker = breaker
        self.in_flight = 0

    def status(self) -> EndpointStatus:
        stats = getattr(self.backend, "engine_stats", None)
        engine = stats() if callable(stats) else None
        return EndpointStatus(
            self.label, self.breaker.state, round(self.breaker.retry_in(), 3), self.in_flight, engine=engine
        )


class ResilientStage(Generic[B]):
    def __init__(
        self,
        errors: StageErrors,
        endpoints: Sequence[tuple[str, B]],
        settings: PolicySettings,
        *,
        reserve_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError(f"the {errors.stage} stage needs at least one endpoint")
        self.errors = errors
        self.settings = settings
        self.endpoints = [
            Endpoint(label, backend, CircuitBreaker(settings.breaker, clock=clock)) for label, backend in endpoints
        ]
        self.admission = Admission(settings.admission, errors.stage, errors.overloaded)
        self.budget = RetryBudget(settings.retry, clock=clock)
        self._reserve_s = reserve_s
        self._rng = rng or random.Random()
        self._turns = itertools.count()

    def statuses(self) -> tuple[EndpointStatus, ...]:
        return tuple(endpoint.status() for endpoint in self.endpoints)

    async def call(self, operation: Callable[[Endpoint[B]], Awaitable[T]]) -> T:
        """`operation` on one endpoint, retried on others as the policy allows (module docstring)."""
        async with self.admission.slot():
            self.budget.record_call()
            return await self._with_retries(operation)

    async def stream(self, open_stream: Callable[[B], AsyncIterator[D]]) -> AsyncIterator[D]:
        """The items of `open_stream` on one endpoint. Retries happen only until the first item arrives; a failure
        after it is the caller's to report (it counts against the endpoint's breaker, and is never retried)."""
        async with self.admission.slot():
            self.budget.record_call()
            endpoint, first, rest = await self._with_retries(lambda endpoint: _opened(endpoint, open_stream))
            if first is None:
                return
            endpoint.in_flight += 1
            try:
                yield first
                async for item in _bounded_reads(rest, self._reserve_s):
                    yield item
            except TimeoutError:
                endpoint.breaker.record(Permit(trial=False), ok=False)
                message = f"the {self.errors.stage} endpoint {endpoint.label}: the request's deadline passed mid-answer"
                raise self.errors.unavailable(message, retryable=False) from None
            except self.errors.endpoint_faults:
                endpoint.breaker.record(Permit(trial=False), ok=False)
                raise
            finally:
                endpoint.in_flight -= 1
                await _close(rest)

    async def _with_retries(self, operation: Callable[[Endpoint[B]], Awaitable[T]]) -> T:
        """The first attempt runs before tenacity is set up, which most calls never need (its retry state costs
        about 30 µs a call); a failure is handed to tenacity as the outcome of its first attempt, so that every
        decision about retrying is tenacity's alike."""
        failures: list[AttemptFailure] = []
        tried: set[str] = set()
        try:
            return await self._attempt(operation, failures, tried)
        except Exception as exc:
            first: Exception | None = exc
        retrying = AsyncRetrying(
            retry=retry_if_exception(is_retryable),
            wait=self._wait,
            stop=lambda state: self._stop(state, failures),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if first is not None:
                        failed, first = first, None
                        raise failed
                    return await self._attempt(operation, failures, tried)
        except Exception as exc:
            raise self._annotated(exc, failures) from exc.__cause__
        raise AssertionError("unreachable: tenacity either returns a result or raises")  # pragma: no cover

    async def _attempt(
        self, operation: Callable[[Endpoint[B]], Awaitable[T]], failures: list[AttemptFailure], tried: set[str]
    ) -> T:
        endpoint, permit = self._pick(tried)
        tried.add(endpoint.label)
        number = len(failures) + 1
        timeout = deadline.bounded(self.settings.breaker.trial_timeout_s if permit.trial else None, self._reserve_s)
        endpoint.in_flight += 1
        recorded = False
        started = time.monotonic()
        try:
            if timeout is not None and timeout <= 0:
                raise self._out_of_time(endpoint, permit)
            async with asyncio.timeout(timeout):
                result = await operation(endpoint)
        except TimeoutError:
            endpoint.breaker.record(permit, ok=False)
            recorded = True
            error = self._out_of_time(endpoint, permit)
            failures.append(self._failure(endpoint, number, error, started))
            raise error from None
        except self.errors.caller_faults as exc:
            endpoint.breaker.abandon(permit)
            recorded = True
            failures.append(self._failure(endpoint, number, exc, started))
            raise
        except Exception as exc:
            endpoint.breaker.record(permit, ok=not isinstance(exc, self.errors.endpoint_faults))
            recorded = True
            failures.append(self._failure(endpoint, number, exc, started))
            raise
        else:
            endpoint.breaker.record(permit, ok=True)
            recorded = True
            return result
        finally:
            endpoint.in_flight -= 1
            if not recorded:  # cancelled (the client went away): no verdict on the endpoint
                endpoint.breaker.abandon(permit)

    def _pick(self, tried: set[str]) -> tuple[Endpoint[B], Permit]:
        """The endpoint for the next attempt (module docstring), with its breaker's permit."""
        turn = next(self._turns)
        count = len(self.endpoints)
        rotated = [self.endpoints[(turn + i) % count] for i in range(count)]
        ranked = sorted(
            (endpoint for endpoint in rotated if endpoint.breaker.available()),
            key=lambda e: (e.label in tried, e.breaker.state == BreakerState.CLOSED, e.in_flight),
        )
        for endpoint in ranked:
            permit = endpoint.breaker.acquire()
            if permit is not None:
                return endpoint, permit
        soonest = min(endpoint.breaker.retry_in() for endpoint in self.endpoints)
        states = ", ".join(f"{e.label} {e.breaker.state}" for e in self.endpoints)
        raise self.errors.unavailable(
            f"the {self.errors.stage} stage has no endpoint to try: every circuit breaker is open or on trial "
            f"({states}); next trial in {soonest:.1f} s",
            retry_after_s=max(1.0, soonest),
            retryable=False,
        )

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome is not None else None
        retry_after = getattr(error, "retry_after_s", None)
        hint = float(retry_after) if isinstance(retry_after, int | float) else None
        return backoff_s(self.settings.retry, state.attempt_number, hint, self._rng)

    def _stop(self, state: RetryCallState, failures: list[AttemptFailure]) -> bool:
        if state.attempt_number >= self.settings.retry.attempts:
            return True
        left = deadline.remaining() - self._reserve_s - state.upcoming_sleep
        took = failures[-1].seconds if failures else 0.0
        if left <= 0 or left < took:
            return True  # an attempt that failed slowly (a hang, a timeout) would not finish a second time
        return not self.budget.try_spend()

    def _out_of_time(self, endpoint: Endpoint[B], permit: Permit) -> Exception:
        why = (
            f"its half-open trial took longer than {self.settings.breaker.trial_timeout_s:g} s"
            if permit.trial and deadline.remaining() - self._reserve_s > self.settings.breaker.trial_timeout_s
            else "the request's deadline passed"
        )
        return self.errors.unavailable(f"the {self.errors.stage} endpoint {endpoint.label}: {why}", retryable=False)

    def _failure(self, endpoint: Endpoint[B], number: int, exc: BaseException, started: float) -> AttemptFailure:
        seconds = time.monotonic() - started
        return AttemptFailure(self.errors.stage, endpoint.label, number, type(exc).__name__, str(exc), seconds)

    def _annotated(self, exc: Exception, failures: list[AttemptFailure]) -> Exception:
        """`exc` with the stage, its attempt and the earlier attempts in its message (module docstring)."""
        attempts = self.settings.retry.attempts
        where = f"{self.errors.stage} stage, attempt {len(failures)} of at most {attempts}"
        earlier = "; ".join(f"#{f.attempt} {f.endpoint}: {f.error_type}: {_clip(f.message)}" for f in failures[:-1])
        exc.args = (f"{exc} [{where}{'; earlier: ' + earlier if earlier else ''}]",)
        exc.attempts = tuple(failures)  # type: ignore[attr-defined]
        return exc


async def _opened(
    endpoint: Endpoint[B], open_stream: Callable[[B], AsyncIterator[D]]
) -> tuple[Endpoint[B], D | None, AsyncIterator[D]]:
    """The stream's first item (None for an empty stream) and the rest: what an attempt of `stream` waits for."""
    iterator = open_stream(endpoint.backend)
    try:
        first = await anext(iterator, None)
    except BaseException:
        await _close(iterator)
        raise
    return endpoint, first, iterator


async def _bounded_reads(iterator: AsyncIterator[D], reserve_s: float) -> AsyncIterator[D]:
    """The items of `iterator`, each read bounded by the request's deadline less `reserve_s` (only the read, never
    the consumer's time between reads): a stream that trickles on leaves the reserve to the answer standing in."""
    while True:
        async with asyncio.timeout(deadline.bounded(None, reserve_s)):
            item = await anext(iterator, None)
        if item is None:
            return
        yield item


async def _close(iterator: AsyncIterator[D]) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()


def _clip(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
