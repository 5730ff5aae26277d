"""The request's deadline, carried in a context variable so that every stage call made for the request sees it.

    with request_deadline(180.0):
        ...                       # remaining() counts down; stage calls bound themselves by it

Outside a request (tests, the stage servers) there is no deadline and `remaining()` is infinite.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_deadline: ContextVar[float | None] = ContextVar("request_deadline", default=None)


@contextmanager
def request_deadline(seconds: float) -> Iterator[None]:
    """Give the code inside (and the tasks it starts) `seconds` in all; an enclosing deadline that ends sooner wins."""
    ends = time.monotonic() + seconds
    outer = _deadline.get()
    token = _deadline.set(ends if outer is None else min(outer, ends))
    try:
        yield
    finally:
        _deadline.reset(token)


def remaining() -> float:
    """Seconds left before the request's deadline (never below 0); infinite outside a request."""
    ends = _deadline.get()
    return math.inf if ends is None else max(0.0, ends - time.monotonic())


def bounded(timeout: float | None, reserve: float = 0.0) -> float | None:
    """`timeout` cut to what is left of the deadline less `reserve`; None (no bound) only when both are unbounded."""
    left = remaining() - reserve
    if timeout is None:
        return None if math.isinf(left) else max(0.0, left)
    return max(0.0, min(timeout, left))
