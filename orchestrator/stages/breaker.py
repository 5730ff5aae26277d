"""A circuit breaker for one endpoint.

    closed ──(failures ≥ N, or failure rate ≥ r over ≥ M calls, within the window)──▶ open
    open ──(open_s passed; the next call is the one trial)──▶ half_open
    half_open ──(the trial succeeded)──▶ closed        half_open ──(the trial failed)──▶ open

While open, or half-open with its trial under way, `acquire()` refuses: callers go to another endpoint or fail fast.
The clock is injected (`time.monotonic` by default) so that tests step through the states without sleeping.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from orchestrator.stage_settings import BreakerSettings


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class Permit:
    """Leave to make one call; `trial` when it is the half-open trial (bounded by `trial_timeout_s`)."""

    trial: bool


class CircuitBreaker:
    def __init__(
        self,
        settings: BreakerSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self.settings = settings
        self.state = BreakerState.CLOSED
        self.transitions = 0
        self._clock = clock
        self._on_change = on_change
        self._outcomes: deque[tuple[float, bool]] = deque()  # (when, ok) within the window, while closed
        self._opened_at = 0.0
        self._trial_running = False

    def available(self) -> bool:
        """Whether `acquire` would grant a call now (without granting it)."""
        if self.state == BreakerState.CLOSED:
            return True
        if self._trial_running:
            return False
        return self.state == BreakerState.HALF_OPEN or self.retry_in() == 0.0

    def acquire(self) -> Permit | None:
        if self.state == BreakerState.CLOSED:
            return Permit(trial=False)
        if not self.available():
            return None
        if self.state == BreakerState.OPEN:
            self._move(BreakerState.HALF_OPEN)
        self._trial_running = True
        return Permit(trial=True)

    def record(self, permit: Permit, ok: bool) -> None:
        """The outcome of a call made under `permit`."""
        if permit.trial:
            self._trial_running = False
            if self.state == BreakerState.HALF_OPEN and ok:
                self._close()
            elif self.state == BreakerState.HALF_OPEN:
                self._open()
            return
        if self.state != BreakerState.CLOSED:
            return  # a call granted before the breaker opened: the trial decides now
        now = self._clock()
        self._outcomes.append((now, ok))
        while self._outcomes and self._outcomes[0][0] < now - self.settings.window_s:
            self._outcomes.popleft()
        if not ok and self._tripped():
            self._open()

    def abandon(self, permit: Permit) -> None:
        """A call made under `permit` ended without a verdict (cancelled): a trial's place goes to the next call."""
        if permit.trial:
            self._trial_running = False

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a trial through (0 when it would now, or is not open)."""
        if self.state != BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.settings.open_s - self._clock())

    def _tripped(self) -> bool:
        calls = len(self._outcomes)
        failures = sum(1 for _, ok in self._outcomes if not ok)
        if failures >= self.settings.failures:
            return True
        return calls >= self.settings.min_calls and failures / calls >= self.settings.failure_rate

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._outcomes.clear()
        self._move(BreakerState.OPEN)

    def _close(self) -> None:
        self._outcomes.clear()
        self._move(BreakerState.CLOSED)

    def _move(self, state: BreakerState) -> None:
        previous, self.state = self.state, state
        if previous != state:
            self.transitions += 1
            if self._on_change is not None:
                self._on_change(previous, state)
