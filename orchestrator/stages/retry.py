"""Which failures are retried, how long to wait, and how many retries the stage can afford.

Retried: failures that say "not now" and cost nothing to repeat — `retryable` unavailability (connection refused or
reset, 408, 429, 5xx, a timeout before any byte of the answer). Never retried: a refusal of the request (4xx), an
answer that arrived broken (garbage, a stream cut after its first bytes), our own admission control.

The wait before attempt n+1 is "full jitter": uniform in [0, min(backoff_max_s, backoff_s · 2ⁿ⁻¹)], raised to the
server's `Retry-After` when it sent one. A retry happens only while the request's deadline leaves room for the wait
and the retry budget allows it: over the last `WINDOW_S` seconds, retries may number at most `budget_ratio` of the
stage's calls plus `budget_per_s` per second — so that during an outage retries cannot multiply the load.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable

from orchestrator.stage_settings import RetrySettings

WINDOW_S = 10


def is_retryable(exc: BaseException) -> bool:
    """Whether asking again may help (see the module docstring)."""
    return getattr(exc, "retryable", False) is True


def backoff_s(settings: RetrySettings, attempt: int, retry_after: float | None, rng: random.Random) -> float:
    """The wait after failed attempt number `attempt` (1-based)."""
    ceiling = min(settings.backoff_max_s, settings.backoff_s * 2 ** (attempt - 1))
    wait = rng.uniform(0.0, ceiling)
    return max(wait, retry_after) if retry_after is not None else wait


class RetryBudget:
    """Calls and retries per second over the last `WINDOW_S` seconds (`settings` as in the module docstring)."""

    def __init__(self, settings: RetrySettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock
        self._seconds: deque[list[int]] = deque()  # [second, calls, retries], oldest first

    def record_call(self) -> None:
        self._bucket()[1] += 1

    def try_spend(self) -> bool:
        """Take one retry from the budget; False when it is spent."""
        bucket = self._bucket()
        calls = sum(entry[1] for entry in self._seconds)
        retries = sum(entry[2] for entry in self._seconds)
        allowed = self._settings.budget_ratio * calls + self._settings.budget_per_s * WINDOW_S
        if retries + 1 > allowed:
            return False
        bucket[2] += 1
        return True

    def _bucket(self) -> list[int]:
        second = int(self._clock())
        while self._seconds and self._seconds[0][0] <= second - WINDOW_S:
            self._seconds.popleft()
        if not self._seconds or self._seconds[-1][0] != second:
            self._seconds.append([second, 0, 0])
        return self._seconds[-1]
