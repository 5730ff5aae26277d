"""The `glm` vision backend over the batching engine when a caller gives a request up: cancelled while it waits for a
slot, while its submission is under way or its worker thread encodes it, or failing after that; none runs, and one
already running leaves its slot."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from batch_engine.engine import BatchEngine
from batch_engine.types import Completion
from tests.glm_vision.helpers import queued, request, unstarted_backend
from tests.raw_http import eventually
from vision_stage.errors import VisionRejected
from vision_stage.facts import image_facts
from vision_stage.glm import GlmVisionBackend
from vision_stage.glm_engine import GlmEngine


async def test_a_cancelled_request_still_waiting_for_a_slot_never_runs(
    batched_engine: GlmEngine, checkpoint: Path
) -> None:
    _, batch, backend = unstarted_backend(batched_engine, checkpoint, 4)
    cancelled = asyncio.create_task(backend.generate(request()))
    await queued(batch, 1)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await _answers_admitting_one(batch, backend)


async def test_a_request_cancelled_while_its_submission_is_under_way_never_runs(
    batched_engine: GlmEngine, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker thread submits, then measures the image: a cancellation then abandons the request at once, before
    the thread is done, so that an engine stepping meanwhile drops it rather than running it unread."""
    _, batch, backend = unstarted_backend(batched_engine, checkpoint, 4)
    measuring, release = threading.Event(), threading.Event()

    def slow_facts(image: Any) -> Any:
        measuring.set()
        release.wait(30)
        return image_facts(image)

    monkeypatch.setattr("vision_stage.glm.image_facts", slow_facts)
    abandoned = _recorded_abandons(batch, monkeypatch)
    cancelled = asyncio.create_task(backend.generate(request()))
    await eventually(measuring.is_set, timeout_s=30)  # submitted; the worker thread still measures the image
    assert batch.waiting == 1
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert [future.cancelled() for future in abandoned] == [True]  # the worker thread still measures the image
    batch.start()
    await eventually(lambda: batch.waiting == 0, timeout_s=30)  # the engine took the request off its queue...
    assert batch.stats().admitted == 0  # ...and dropped it
    release.set()
    monkeypatch.setattr("vision_stage.glm.image_facts", image_facts)
    await _answers_admitting_one(batch, backend, started=True)


@pytest.mark.parametrize("wrapped", [False, True])
async def test_a_request_cancelled_while_the_worker_thread_encodes_it_never_runs(
    batched_engine: GlmEngine, checkpoint: Path, monkeypatch: pytest.MonkeyPatch, wrapped: bool
) -> None:
    """A cancellation before the worker thread has even submitted (it still runs the processor): the request is
    abandoned before it reaches the engine, so nothing is queued. `wrapped`: an engine wrapped so that it makes its
    own future; the one it returns is abandoned once the thread is done, and the engine drops it."""
    glm, batch, backend = unstarted_backend(batched_engine, checkpoint, 4)
    encoding, release = threading.Event(), threading.Event()
    real_encode, real_submit = glm.codec.encode, batch.submit
    submitted: list[tuple[Future[Completion], int]] = []

    def slow_encode(*args: Any, **kwargs: Any) -> Any:
        encoding.set()
        release.wait(30)
        return real_encode(*args, **kwargs)

    def recorded_submit(*args: Any, future: Future[Completion] | None = None, **kwargs: Any) -> Future[Completion]:
        returned = real_submit(*args, future=None if wrapped else future, **kwargs)
        submitted.append((returned, batch.waiting))
        return returned

    monkeypatch.setattr(glm.codec, "encode", slow_encode)
    monkeypatch.setattr(batch, "submit", recorded_submit)
    cancelled = asyncio.create_task(backend.generate(request()))
    await eventually(encoding.is_set, timeout_s=30)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    release.set()
    await eventually(lambda: len(submitted) == 1, timeout_s=30)
    ((returned, waiting),) = submitted
    await eventually(returned.cancelled, timeout_s=30)
    assert waiting == (1 if wrapped else 0)  # queued only where the engine made a future of its own
    monkeypatch.setattr(glm.codec, "encode", real_encode)
    await _answers_admitting_one(batch, backend)  # the cancelled one dropped, never admitted


async def test_a_submission_failing_after_its_task_was_cancelled_is_logged_as_no_one_s_error(
    batched_engine: GlmEngine, checkpoint: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker thread's error (here the image's facts) comes after its task was cancelled: asyncio must not log
    it as a task exception never retrieved."""
    _, _, backend = unstarted_backend(batched_engine, checkpoint, 4)
    measuring, release, raised = threading.Event(), threading.Event(), threading.Event()

    def failing_facts(image: Any) -> Any:
        measuring.set()
        release.wait(30)
        raised.set()
        raise VisionRejected("the image's colours could not be measured")

    monkeypatch.setattr("vision_stage.glm.image_facts", failing_facts)
    cancelled = asyncio.create_task(backend.generate(request()))
    await eventually(measuring.is_set, timeout_s=30)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    del cancelled
    release.set()
    await eventually(raised.is_set, timeout_s=30)
    await asyncio.sleep(0.2)  # the thread's future completes and its callbacks run on this loop
    gc.collect()
    assert not [record for record in caplog.records if "never retrieved" in record.getMessage()]
    await backend.aclose()


async def test_an_image_failing_once_its_request_runs_leaves_the_slot_after_a_step(
    batched_engine: GlmEngine, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image's facts fail while the engine already decodes its request: the request is abandoned (it leaves its
    slot after the next step) rather than decoding its whole budget unread."""
    _, batch, backend = unstarted_backend(batched_engine, checkpoint, 200)

    def failing_facts(image: Any) -> Any:
        deadline = time.monotonic() + 30
        while batch.running == 0 and time.monotonic() < deadline:  # admitted: its future can no longer be cancelled
            time.sleep(0.001)
        raise VisionRejected("the image's colours could not be measured")

    monkeypatch.setattr("vision_stage.glm.image_facts", failing_facts)
    abandoned = _recorded_abandons(batch, monkeypatch)
    batch.start()
    try:
        with pytest.raises(VisionRejected):
            await backend.generate(request())
        assert len(abandoned) == 1
        assert not abandoned[0].cancelled()  # it was running
        await eventually(lambda: batch.running == 0, timeout_s=30)
    finally:
        await backend.aclose()


def _recorded_abandons(batch: BatchEngine, monkeypatch: pytest.MonkeyPatch) -> list[Future[Completion]]:
    """The futures `batch.abandon` is called with from now on, in order (it still abandons them)."""
    abandoned: list[Future[Completion]] = []
    real_abandon = batch.abandon

    def abandon(future: Future[Completion]) -> None:
        abandoned.append(future)
        real_abandon(future)

    monkeypatch.setattr(batch, "abandon", abandon)
    return abandoned


async def _answers_admitting_one(batch: BatchEngine, backend: GlmVisionBackend, *, started: bool = False) -> None:
    """`batch` started (unless it is), `backend` answers a request, and the engine has admitted that one request
    only."""
    if not started:
        batch.start()
    try:
        assert (await backend.generate(request())).answer
    finally:
        await backend.aclose()
    assert batch.stats().admitted == 1
