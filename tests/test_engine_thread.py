"""The batching engine over the tiny GLM-4.6V model as its callers and its thread see it: concurrent submitters, the
queue's refusals, closing, abandoning, a failed step, the prefill budget, its counters, and the attention plans its
thread builds (the engine's answers against plain `generate`: `test_batching.py`)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Any
from unittest import mock

import pytest
import torch

from batch_engine.types import Completion
from tests.vision_engine import BUDGET, engine, prompt, submit
from vision_stage.errors import VisionRejected, VisionUnavailable
from vision_stage.glm_engine import GlmEngine


def test_the_thread_serves_concurrent_submitters(glm: GlmEngine) -> None:
    prompts = [prompt(glm, 40 + n, f"thread {n}?") for n in range(3)]
    expected = [glm.generate_ids(encoded, BUDGET) for encoded in prompts]
    batch = engine(glm)
    batch.start()
    results: dict[int, list[int]] = {}

    def ask(n: int) -> None:
        results[n] = submit(batch, prompts[n], f"t{n}").result(timeout=60).ids

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(3)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        batch.close()
    assert [results[n] for n in range(3)] == expected
    with pytest.raises(VisionUnavailable, match="closed"):
        submit(batch, prompts[0], "late")


def test_a_full_queue_refuses_with_a_retry_hint_and_a_long_prompt_is_rejected(glm: GlmEngine) -> None:
    batch = engine(glm, queue_size=1)
    encoded = prompt(glm, 50)
    submit(batch, encoded, "q1")
    with pytest.raises(VisionUnavailable, match="waiting") as refused:
        submit(batch, encoded, "q2")
    assert refused.value.retry_after_s == 1.0
    long = prompt(glm, 50, "how much " * 150 + "?")
    assert long.prompt_tokens >= 256
    with pytest.raises(VisionRejected, match="holds at most 256"):
        submit(engine(glm, max_tokens=256), long, "long")


def test_close_fails_what_waits_and_runs(glm: GlmEngine) -> None:
    batch = engine(glm, slots=1)
    running, waiting = submit(batch, prompt(glm, 60), "x"), submit(batch, prompt(glm, 61), "y")
    batch.step()
    batch.close()
    for future in (running, waiting):
        with pytest.raises(VisionUnavailable, match="closed"):
            future.result()


def test_stats_count_steps_batches_waits_and_prefix_hits(glm: GlmEngine) -> None:
    batch = engine(glm, slots=2)
    first, again = prompt(glm, 80, "what is the total?"), prompt(glm, 80, "and the date?")
    for encoded, key in ((first, "s"), (prompt(glm, 81), "t"), (again, "s")):
        submit(batch, encoded, key, 5)
    assert batch.stats().waiting == 3
    batch.run_until_idle()
    stats = batch.stats()
    assert (stats.running, stats.waiting, stats.admitted) == (0, 0, 3)
    assert stats.steps == len(batch.batch_sizes) > 0
    assert 1.0 <= stats.mean_batch <= 2.0
    assert stats.mean_queue_ms > 0
    assert (stats.prefix_hits, stats.encoder_hits) == (1, 0)


def test_a_failed_decode_step_fails_the_running_requests_as_unavailable_and_the_engine_serves_on(
    glm: GlmEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = engine(glm)
    encoded = prompt(glm, 90)
    expected = glm.generate_ids(encoded, BUDGET)
    running = submit(batch, encoded, "f1")

    def broken(bucket: int, span: int) -> None:
        raise ValueError("a shape the model refused")

    with monkeypatch.context() as patched:
        patched.setattr(batch.device, "_decode_step", broken)
        batch.start()
        with pytest.raises(VisionUnavailable, match=r"decode step failed \(ValueError"):
            running.result(timeout=60)
    try:
        assert submit(batch, encoded, "f2").result(timeout=60).ids == expected
    finally:
        batch.close()


@pytest.mark.parametrize(("prefill_tokens", "admitted_at_once"), [(8192, 2), (1, 1)])
def test_the_prefill_budget_spreads_admissions_over_steps(
    glm: GlmEngine, prefill_tokens: int, admitted_at_once: int
) -> None:
    batch = engine(glm, prefill_tokens=prefill_tokens)
    submit(batch, prompt(glm, 95, "what is it?"), "x")
    batch.run_until_idle()
    for question in ("and the total?", "and the date?"):  # follow-ups: no image to prefill, only their text
        submit(batch, prompt(glm, 95, question), "x")
    batch.step()
    assert (batch.running, batch.waiting) == (admitted_at_once, 2 - admitted_at_once)
    batch.run_until_idle()
    assert batch.stats().prefix_hits == 2


@pytest.mark.parametrize(("overlap", "written"), [(True, 2), (False, 3)])
def test_an_abandoned_request_leaves_its_slot_after_one_step_and_a_waiting_one_never_runs(
    glm: GlmEngine, overlap: bool, written: int
) -> None:
    batch = engine(glm, slots=1, overlap=overlap)
    running, waiting = submit(batch, prompt(glm, 100), "x", 200), submit(batch, prompt(glm, 101), "y", 4)
    batch.step()
    assert (batch.running, batch.waiting) == (1, 1)
    batch.abandon(running)
    batch.abandon(waiting)
    batch.step()
    assert batch.running == 0
    # The first step: prefill, one decode launched (and read, without overlap); the next: that one's token read
    # (with overlap), one more launched (and read without; with, it is read at the next step and dropped); of 200.
    assert len(running.result().ids) == written
    if overlap:
        assert batch.step()  # the dropped step's tokens are read
    assert not batch.step()  # the cancelled one is taken from the queue and dropped: nothing ran
    assert (batch.running, batch.waiting) == (0, 0)
    assert waiting.cancelled()
    assert not batch._abandoned, "nothing is kept of the requests it abandoned"


def test_a_future_given_to_submit_is_the_one_completed_and_one_abandoned_first_is_never_queued(
    glm: GlmEngine,
) -> None:
    batch = engine(glm, slots=2)
    encoded = prompt(glm, 104)
    made: Future[Completion] = Future()
    assert batch.submit(encoded.inputs, image_key="m", max_new_tokens=2, future=made) is made
    batch.run_until_idle()
    assert len(made.result().ids) == 2
    abandoned: Future[Completion] = Future()
    batch.abandon(abandoned)  # its caller left before the submission came
    assert batch.submit(encoded.inputs, image_key="a", max_new_tokens=2, future=abandoned) is abandoned
    assert abandoned.cancelled()
    assert batch.waiting == 0
    with pytest.raises(ValueError, match="new Future"):
        batch.submit(encoded.inputs, image_key="d", max_new_tokens=2, future=made)  # done already
    running: Future[Completion] = Future()
    running.set_running_or_notify_cancel()
    with pytest.raises(ValueError, match="new Future"):
        batch.submit(encoded.inputs, image_key="r", max_new_tokens=2, future=running)
    assert batch.waiting == 0


def test_a_request_queued_as_the_engine_closes_fails_rather_than_waiting_forever(
    glm: GlmEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`close` empties the queue; a submission that passed the closed check just before and queues just after is
    failed by `submit` itself."""
    batch = engine(glm, slots=1)
    real_prepare = batch.prepare

    def closing_meanwhile(*args: Any, **kwargs: Any) -> Any:
        batch.close()
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(batch, "prepare", closing_meanwhile)
    late = submit(batch, prompt(glm, 105), "late")
    with pytest.raises(VisionUnavailable, match="closed"):
        late.result(timeout=5)
    assert batch.waiting == 0


def test_abandoning_a_finished_request_keeps_nothing(glm: GlmEngine) -> None:
    batch = engine(glm, slots=2)
    done = submit(batch, prompt(glm, 102), "d", 2)
    batch.run_until_idle()
    batch.abandon(done)  # its caller left just as it finished
    assert not batch._abandoned
    batch._abandoned.add(done)  # as if the finish came between the check and the adding
    running = submit(batch, prompt(glm, 103), "r", 4)
    batch.run_until_idle()
    assert len(running.result().ids) == 4
    assert not batch._abandoned


def test_the_engine_builds_its_attention_plans_on_its_own_thread_before_start_returns(glm: GlmEngine) -> None:
    """cuDNN keeps its plans per thread (`batch_engine.attention_plans`): built on the caller's, the engine's thread
    would build them again at its first requests."""
    calls: list[tuple[str, int, bool]] = []

    def planning(model: Any, max_tokens: int, *, vision: bool) -> None:
        assert model is glm.model
        time.sleep(0.2)  # as building plans takes a while: `start` must wait for it
        calls.append((threading.current_thread().name, max_tokens, vision))

    batch = engine(glm)
    with mock.patch("batch_engine.engine.build_plans", planning):
        batch.start()
        assert calls == [("batch-engine", 256, True)]  # before `start` returned
    batch.close()


@pytest.mark.parametrize("planned", [True, False])
def test_a_prefill_lays_out_its_attention_s_tensors_only_where_cudnn_plans_per_power_of_two(
    glm: GlmEngine, planned: bool
) -> None:
    """The copies serve cuDNN's plans per power of two (`batch_engine.attention_plans`) and nothing else: never off a
    CUDA device, whatever the environment says."""
    import os

    from batch_engine import attention_plans
    from batch_engine.attention_plans import VARIABLE, positions_outer

    laid_out: list[tuple[int, ...]] = []

    def recording(tensor: torch.Tensor) -> torch.Tensor:
        laid_out.append(tuple(tensor.shape))
        return positions_outer(tensor)

    with mock.patch.dict(os.environ, {VARIABLE: "1"}), mock.patch.object(attention_plans, "positions_outer", recording):
        batch = engine(glm)
        assert batch.device.plans_by_power_of_two is False  # on the CPU
        batch.device.plans_by_power_of_two = planned  # as on a GPU with the variable set, or not
        encoded = prompt(glm, 3)
        future = submit(batch, encoded, "laid out", budget=2)
        batch.run_until_idle()
        assert future.result().ids == glm.generate_ids(encoded, 2)
    layers = glm.model.config.get_text_config().num_hidden_layers
    assert len(laid_out) == (3 * layers if planned else 0)  # query, key and value of each layer's prefill


def test_the_engine_s_thread_plans_recurring_attention_calls_while_idle_and_answers_as_before(glm: GlmEngine) -> None:
    """As on a GPU where cuDNN plans per power of two: the prefill and encoder calls of two requests of one size
    recur; the engine's thread builds their plans between requests, and a third request hands them on as they are."""
    from batch_engine.attention_plans import RecurringCalls

    as_they_are: list[bool] = []

    class Recording(RecurringCalls):
        def arrange(self, query: torch.Tensor, *tensors: torch.Tensor, **call: Any) -> Any:
            arranged = super().arrange(query, *tensors, **call)
            as_they_are.append(arranged[0] is query)
            return arranged

    encoded = [prompt(glm, seed) for seed in (3, 4, 5)]  # three images of one size
    expected = [glm.generate_ids(one, 2) for one in encoded]
    batch = engine(glm)
    batch.recurring = calls = Recording()
    batch.device.plans_by_power_of_two = True
    with mock.patch("batch_engine.vision_attention.planned_on", return_value=True):
        batch.start()
        try:
            for n, one in enumerate(encoded):
                if n == 2:  # both calls met in two prefills: planned while the thread idles
                    deadline = time.monotonic() + 30
                    while len(calls.planned) < 2 and time.monotonic() < deadline:
                        time.sleep(0.01)
                    assert len(calls.planned) == 2  # the text prefill's and the encoder's
                    as_they_are.clear()
                assert submit(batch, one, f"recurring {n}", budget=2).result(timeout=60).ids == expected[n]
        finally:
            batch.close()
    layers = glm.model.config.get_text_config().num_hidden_layers
    assert all(as_they_are)  # the third request's calls, on their own plans
    assert len(as_they_are) == layers + glm.model.config.vision_config.depth


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's death, expected
def test_start_returns_even_when_the_engine_s_thread_fails_before_it_serves(glm: GlmEngine) -> None:
    batch = engine(glm)
    with mock.patch("batch_engine.engine.build_plans", side_effect=RuntimeError("no plans")):
        batch.start()  # the thread died; `start` does not wait for it forever
    batch.close()
