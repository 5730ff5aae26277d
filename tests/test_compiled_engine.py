"""The batching engine with compiled layers and with its Triton decode kernel (run by Triton's interpreter), on the
tiny text checkpoints of `tests.text_engine` on the CPU: the same tokens as plain `generate`, the dynamo settings on
the engine's own thread, and no compilation at request time under automatic dynamic shapes."""

from __future__ import annotations

import itertools
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from batch_engine.compiling import (
    DYNAMO_SETTINGS,
    WARM_REUSED,
    recompile_limit_hits,
    warm_prefills,
    watch_recompile_limit,
)
from batch_engine.engine import BatchEngine
from batch_engine.graphs import EXTEND_BUCKETS
from batch_engine.settings import EngineSettings
from reasoning_stage.batched import REFUSALS
from reasoning_stage.chat_model import ChatModel
from reasoning_stage.local import LocalReasoningBackend
from reasoning_stage.types import ChatMessage, ReasoningRequest
from tests.text_engine import BUDGET, QUESTIONS, ids_of, joining, submit


def dynamo_settings() -> dict[str, Any]:
    """The settings of `DYNAMO_SETTINGS` as the calling thread (its context) reads them."""
    return {name: getattr(torch._dynamo.config, name) for name in DYNAMO_SETTINGS}


def uncompile(chat: ChatModel) -> None:
    """The module-scoped model's layers as they were before an engine compiled them, for the other tests."""
    decoder: Any = chat.model.model  # type: ignore[attr-defined]
    for layer in decoder.layers:
        layer._compiled_call_impl = None


@pytest.mark.parametrize(("shapes", "padded"), [("dynamic", False), ("automatic", False), ("automatic", True)])
def test_compiled_layers_equal_plain_generate_for_prompts_of_several_lengths(
    chat: ChatModel, shapes: str, padded: bool
) -> None:
    """`torch.compile`d decoder layers (the engine's default on a GPU), either way of treating sizes: prompts of
    four lengths, joining at different steps, so that prefill and decode steps each meet more than one size; and
    with the prefills padded to their length bucket (`prefill_graphs`: on a GPU each bucket a captured graph; run
    eagerly here)."""
    prompts = [ids_of(chat, question) for question in QUESTIONS]
    assert len({len(prompt) for prompt in prompts}) > 2
    expected = [chat.complete(prompt, max_new_tokens=BUDGET - n, temperature=0.0) for n, prompt in enumerate(prompts)]
    settings = EngineSettings(slots=4, max_tokens=256, compile=True, compile_shapes=shapes, prefill_graphs=padded)
    try:
        assert joining(BatchEngine(chat.model, settings, REFUSALS), prompts) == expected
    finally:
        uncompile(chat)


def test_the_engine_s_thread_compiles_under_the_engine_s_dynamo_settings(chat: ChatModel) -> None:
    """Torch keeps dynamo's settings per thread: the engine's thread, where prefills and decode steps compile, sets
    them itself (without them each layer compiles apart and the layers past the recompile limit run uncompiled)."""
    seen: list[dict[str, Any]] = []
    engine = BatchEngine(chat.model, EngineSettings(slots=2, max_tokens=256, compile=True), REFUSALS)
    try:
        engine.start()
        future = engine.submit(
            {"input_ids": torch.tensor([ids_of(chat, QUESTIONS[0])])},
            image_key=None,
            max_new_tokens=3,
            on_token=lambda _: seen.append(dynamo_settings()),  # called on the engine's thread
        )
        future.result(timeout=300)
    finally:
        engine.close()
        uncompile(chat)
    assert seen == [DYNAMO_SETTINGS] * 3


@pytest.mark.parametrize(("shapes", "planned"), [("dynamic", False), ("automatic", False), ("automatic", True)])
def test_after_start_no_prefill_compiles_neither_a_new_length_nor_one_after_a_reused_prefix(
    chat: ChatModel, shapes: str, planned: bool
) -> None:
    """The start prefills both kinds (`warm_prefills`): prompts of lengths not seen before, and a follow-up that
    reuses a prefix and adds more than an extend step takes, compile nothing at request time. `planned`: as on a GPU
    where cuDNN plans per power of two, the prefill's attention an operator of the engine's (`causal_attention`), and
    three prompts of one length, whose call then gets its own plan (`attention_plans.RecurringCalls`)."""
    from torch._dynamo.utils import counters

    from batch_engine.attention_plans import RecurringCalls

    assert EXTEND_BUCKETS[-1] < WARM_REUSED, "the warm-up's reused prefill would be an extend step"
    vocab = chat.model.config.vocab_size
    first, *again, last = ([1 + (i * step) % (vocab - 1) for i in range(200)] for step in (7, 13, 17, 19))
    follow_up = first[:96] + [1 + (i * 11) % (vocab - 1) for i in range(160)]  # reuses 96 (a multiple of 32)
    prompts = [*(ids_of(chat, question) for question in QUESTIONS[:2]), first, *(again if planned else ()), follow_up]
    expected = [chat.complete(prompt, max_new_tokens=1, temperature=0.0) for prompt in [*prompts, last]]
    settings = EngineSettings(slots=2, max_tokens=512, compile=True, compile_shapes=shapes)
    engine = BatchEngine(chat.model, settings, REFUSALS)
    engine.device.plans_by_power_of_two = planned
    engine.recurring = calls = RecurringCalls() if planned else None
    try:
        engine.start()
        compiled = counters["stats"]["unique_graphs"]
        done = [submit(engine, prompt, 1).result(timeout=300) for prompt in prompts]  # prefills only
        assert counters["stats"]["unique_graphs"] == compiled, "a prefill compiled at request time"
        assert [completion.ids for completion in done] == expected[:-1]
        assert done[-1].reused_tokens == 96
        deadline = time.monotonic() + 30
        while calls is not None and not calls.planned and time.monotonic() < deadline:
            time.sleep(0.01)  # the engine's thread plans while it idles
        if calls is not None:
            assert len(calls.planned) == 1  # the 200 tokens' call
            # one more of them, its attention handed on as it is, inside the compiled layers
            assert submit(engine, last, 1).result(timeout=300).ids == expected[-1]
            assert counters["stats"]["unique_graphs"] == compiled, "a prefill on its own plan compiled"
    finally:
        engine.close()
        uncompile(chat)


@pytest.mark.parametrize("shapes", ["dynamic", "automatic"])
def test_after_start_no_prefill_with_rows_riding_along_compiles(chat: ChatModel, shapes: str) -> None:
    """Each request joins a step after the one before, so that its prefill takes one, two, then three rows along
    (`DeviceSteps.rides`): after the start's warm-up (`BatchEngine.start` without its thread: the test steps the engine
    itself) none compiles at request time. The decode steps, not captured on the CPU, may. From a fresh start of
    dynamo, as a process's first engine starts: the module's other tests compiled the same layers' code at other
    sizes, and what dynamo keeps of that changes what it compiles next."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    prompts = [ids_of(chat, question) for question in QUESTIONS]
    expected = [chat.complete(prompt, max_new_tokens=BUDGET, temperature=0.0) for prompt in prompts]
    settings = EngineSettings(slots=4, max_tokens=512, compile=True, compile_shapes=shapes, ride_along=True)
    engine = BatchEngine(chat.model, settings, REFUSALS)
    compiled: list[int] = []
    prefill = engine.device.prefill

    def counting(prompt: Any, row: int, stored: Any, longest: int = 0) -> int:
        before = counters["frames"]["ok"]  # frames, not graphs: a frame whose graph is empty compiles too
        token = prefill(prompt, row, stored, longest)
        if longest:
            compiled.append(counters["frames"]["ok"] - before)
        return token

    try:
        warm_prefills(engine.prepare, engine.device)
        engine.device.prefill = counting  # type: ignore[method-assign]
        futures = []
        for prompt in prompts:
            futures.append(submit(engine, prompt))
            engine.step()
        engine.run_until_idle()
        assert [future.result().ids for future in futures] == expected
    finally:
        uncompile(chat)
    assert compiled == [0, 0, 0], "a prefill with rows riding along compiled at request time"


def test_the_triton_decode_kernel_equals_plain_generate_as_requests_join_and_leave(
    chat: ChatModel, triton_interpreter: None
) -> None:
    prompts = [ids_of(chat, question) for question in QUESTIONS]
    budgets = [BUDGET, 9, BUDGET - 2, 14]  # rows finish out of order, so a later row moves into a freed one
    expected = [chat.complete(p, max_new_tokens=b, temperature=0.0) for p, b in zip(prompts, budgets, strict=True)]
    engine = BatchEngine(chat.model, EngineSettings(slots=3, max_tokens=256, decode_kernel=True), REFUSALS)
    assert engine.device.decode_step.kernel
    futures = [submit(engine, prompts[0], budgets[0])]
    engine.step()
    futures += [submit(engine, prompt, budget) for prompt, budget in zip(prompts[1:], budgets[1:], strict=True)]
    engine.run_until_idle()
    assert [future.result().ids for future in futures] == expected
    assert max(engine.batch_sizes) == 3


async def test_a_sampled_request_beside_the_compiled_engine_runs_under_its_dynamo_settings(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sampled request runs plain `generate` on the engine's compiled layers, in a worker thread whose context is a
    copy of the event loop's: it sets the engine's dynamo settings there too."""
    seen: list[dict[str, Any]] = []
    complete = ChatModel.complete

    def recording(self: ChatModel, *args: Any, **kwargs: Any) -> list[int]:
        seen.append(dynamo_settings())
        return complete(self, *args, **kwargs)

    with ThreadPoolExecutor(1) as fresh:
        defaults = fresh.submit(dynamo_settings).result()  # a new thread's context holds none of a program's settings
    with torch._dynamo.config.patch(defaults):  # the event loop's thread as a service's is (tests here compiled on it)
        batching = EngineSettings(slots=2, max_tokens=256, compile=True)
        backend = await LocalReasoningBackend.load(str(checkpoint), device="cpu", dtype="float32", batching=batching)
        monkeypatch.setattr(ChatModel, "complete", recording)
        try:
            asked = ReasoningRequest((ChatMessage("user", QUESTIONS[0]),), max_new_tokens=4, temperature=0.8)
            assert (await backend.generate(asked)).completion_tokens == 4
        finally:
            await backend.aclose()
    assert seen == [DYNAMO_SETTINGS]


def reach_the_recompile_limit() -> None:
    """Compile a function (a new code object each call: dynamo keeps its compilations per code object) for three sizes
    under a limit of one compilation: past it the function runs uncompiled."""

    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    fresh = types.FunctionType(double.__code__.replace(co_name=f"double_{next(_FRESH)}"), globals())
    compiled = torch.compile(fresh, backend="eager", dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=1):
        for size in (1, 2, 3):
            assert torch.equal(compiled(torch.ones(size)), torch.full((size,), 2.0))


_FRESH = itertools.count()


def test_dynamo_reaching_its_recompile_limit_is_counted() -> None:
    """Past the limit a compiled function runs uncompiled, which only a warning in the log said: it is counted
    (`recompile_limit_hits`), for the engine's stats and so for `/metrics`."""
    watch_recompile_limit()
    before = recompile_limit_hits()
    reach_the_recompile_limit()
    assert recompile_limit_hits() > before


def test_the_engine_s_stats_carry_the_count_when_its_layers_are_compiled(chat: ChatModel) -> None:
    engine = BatchEngine(chat.model, EngineSettings(slots=2, max_tokens=256, compile=True), REFUSALS)
    try:
        reach_the_recompile_limit()
        assert engine.stats().recompile_limit_hits == recompile_limit_hits() > 0
    finally:
        uncompile(chat)
    assert BatchEngine(chat.model, EngineSettings(slots=2, max_tokens=256), REFUSALS).stats().recompile_limit_hits == 0
