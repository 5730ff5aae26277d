"""A request as the batching engine (`batch_engine.engine`) holds it from `submit` to its completion, and how it is
taken from the bounded queue it waits in (the engine's own)."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from batch_engine.prompts import Prompt
from batch_engine.stores import StoredKV
from batch_engine.types import Completion


@dataclass(eq=False)
class Request:
    """One prompt with its token budget and the future its caller waits on; `length` is what its slot holds."""

    prompt: Prompt
    budget: int
    future: Future[Completion]
    submitted: float = field(default_factory=time.perf_counter)
    tokens: list[int] = field(default_factory=list)
    length: int = 0
    reused: int = 0
    admitted: float = 0.0
    first_token: float = 0.0
    stored: StoredKV | None = None
    """The prefix found for it, between its lookup and its prefill."""
    looked_up: bool = False
    on_token: Callable[[int], None] | None = None


Launched = tuple[list[Request], Callable[[], list[int]]]
"""A launched decode step: its rows' requests in row order, and the call that gives their tokens."""


def take(source: queue.Queue[Request]) -> Request | None:
    """The next waiting request, or None when none waits."""
    try:
        return source.get_nowait()
    except queue.Empty:
        return None


def drain(source: queue.Queue[Request]) -> list[Request]:
    """Every waiting request, taken out of the queue."""
    drained = []
    while (request := take(source)) is not None:
        drained.append(request)
    return drained
