"""Admission control for one stage: at most `max_in_flight` calls at once and `max_queue` waiting for a turn.

A call beyond both bounds is refused at once (the stage's `…Overloaded` error, with a short `Retry-After`), and a
waiting call gives up when the request's deadline leaves no time to wait: latency stays bounded under overload
instead of growing with the queue.

Bulk work (the requests a batch sends, `BULK` set for them) may hold at most `max_in_flight` less a quarter of it (at
least one slot is kept free when there are two or more): the rest stays free for interactive requests however many
batches run, and bulk calls waiting for their share are not counted against the queue interactive calls wait in.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar

from orchestrator.stage_settings import AdmissionSettings
from orchestrator.stages import deadline

OVERLOADED_RETRY_AFTER_S = 1.0
BULK: ContextVar[bool] = ContextVar("bulk", default=False)
"""Set for the requests of a batch (`orchestrator.bulk`): they take their turns from the bulk share."""


class Admission:
    def __init__(self, settings: AdmissionSettings, stage: str, overloaded: Callable[[str, float], Exception]) -> None:
        """`overloaded(message, retry_after_s)` builds the stage's error."""
        self.settings = settings
        self.in_flight = 0
        self.waiting = 0
        self._stage = stage
        self._overloaded = overloaded
        self._slots = asyncio.Semaphore(settings.max_in_flight)
        self.bulk_share = max(1, settings.max_in_flight - max(1, settings.max_in_flight // 4))
        self._bulk = asyncio.Semaphore(self.bulk_share)
        self.bulk_waiting = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the stage's slots for the block; raise the stage's overloaded error when none is to be had.
        Bulk work first waits for a turn within its share, counted apart (`bulk_waiting`): it never takes an
        interactive call's place in the queue."""
        async with contextlib.AsyncExitStack() as held:
            if BULK.get():
                self.bulk_waiting += 1
                try:
                    await self._acquire(self._bulk, held)
                finally:
                    self.bulk_waiting -= 1
            if self._slots.locked() and self.waiting >= self.settings.max_queue:
                raise self._refusal(f"{self.in_flight} calls in flight and {self.waiting} waiting")
            self.waiting += 1
            try:
                await self._acquire(self._slots, held)
            finally:
                self.waiting -= 1
            self.in_flight += 1
            try:
                yield
            finally:
                self.in_flight -= 1

    async def _acquire(self, semaphore: asyncio.Semaphore, held: contextlib.AsyncExitStack) -> None:
        """A free slot is taken at once (no timer: nothing waits); otherwise the wait ends with the deadline."""
        if semaphore.locked():
            try:
                async with asyncio.timeout(deadline.bounded(None)):
                    await semaphore.acquire()
            except TimeoutError:
                raise self._refusal("the request's deadline passed while it waited for a turn") from None
        else:
            await semaphore.acquire()
        held.callback(semaphore.release)

    def _refusal(self, why: str) -> Exception:
        limits = f"at most {self.settings.max_in_flight} in flight and {self.settings.max_queue} waiting"
        return self._overloaded(f"the {self._stage} stage is overloaded ({why}; {limits})", OVERLOADED_RETRY_AFTER_S)
