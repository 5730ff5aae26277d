"""The `local` reasoning backend on the batching engine (`reasoning_stage.batched`, `batch_engine`), on tiny random
GLM-4 and Llama checkpoints on the CPU: the engine against plain `generate` token for token (one request, requests
joining a running batch at different steps, more requests than slots), and the backend's behaviour with it
(streaming, sampling, cancellation, closing, a prompt too long for a slot), its settings and its command line.

The checkpoints and the prompts are `tests.text_engine`'s; the compiled engine and the Triton kernel are tested in
`tests/test_compiled_engine.py`.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batch_engine.engine import BatchEngine
from batch_engine.settings import EngineSettings, engine_settings
from bench.gpu_alone import ONE_REQUEST_ROWS
from orchestrator.settings import Settings
from reasoning_stage.__main__ import _parser
from reasoning_stage.batched import REFUSALS, matches_generate
from reasoning_stage.chat_model import ChatModel
from reasoning_stage.errors import ReasoningModelError, ReasoningRejected, ReasoningUnavailable
from reasoning_stage.local import LocalReasoningBackend
from reasoning_stage.types import ChatMessage, ReasoningDelta, ReasoningRequest
from tests.text_engine import BUDGET, ENGINE, QUESTIONS, ids_of, joining, submit


def test_one_request_equals_plain_generate(chat: ChatModel) -> None:
    prompt = ids_of(chat, QUESTIONS[0])
    expected = chat.complete(prompt, max_new_tokens=BUDGET, temperature=0.0)
    assert len(set(expected)) > 4, "the sharpened model should not repeat one token"
    engine = BatchEngine(chat.model, ENGINE, REFUSALS)
    future = submit(engine, prompt)
    engine.run_until_idle()
    assert future.result().ids == expected
    assert engine.device.axes == 1, "a text model's positions are plain"


def test_requests_joining_at_different_steps_each_equal_plain_generate(chat: ChatModel) -> None:
    prompts = [ids_of(chat, question) for question in QUESTIONS]
    expected = [chat.complete(prompt, max_new_tokens=BUDGET - n, temperature=0.0) for n, prompt in enumerate(prompts)]
    engine = BatchEngine(chat.model, ENGINE, REFUSALS)
    assert joining(engine, prompts) == expected
    assert max(engine.batch_sizes) >= 3, "the requests overlapped"


def test_more_requests_than_slots_wait_and_each_equals_plain_generate(chat: ChatModel) -> None:
    prompts = [ids_of(chat, question) for question in QUESTIONS]
    budgets = [6, 18, 9, 14]  # rows finish out of order, so the last row moves into freed ones
    expected = [chat.complete(p, max_new_tokens=b, temperature=0.0) for p, b in zip(prompts, budgets, strict=True)]
    engine = BatchEngine(chat.model, EngineSettings(slots=2, max_tokens=256), REFUSALS)
    futures = [submit(engine, prompt, budget) for prompt, budget in zip(prompts, budgets, strict=True)]
    engine.run_until_idle()
    assert [future.result().ids for future in futures] == expected
    assert max(engine.batch_sizes) == 2


@pytest.fixture
def started(chat: ChatModel) -> Iterator[BatchEngine]:
    """A batching engine over `chat`'s model, started, closed after the test."""
    engine = BatchEngine(chat.model, ENGINE, REFUSALS)
    engine.start()
    yield engine
    engine.close()


def test_the_warm_up_check_compares_with_plain_generate(chat: ChatModel, started: BatchEngine) -> None:
    assert matches_generate(chat, started)


@pytest.mark.parametrize("diagnosis", ["reads", "fails"])
def test_the_warm_up_check_logs_a_difference_from_plain_generate(
    chat: ChatModel,
    started: BatchEngine,
    diagnosis: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(chat, "complete", lambda prompt, **_: [0] * 8)
    if diagnosis == "fails":  # reading plain's scores where they part fails: the check still answers and logs

        def failing(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("out of memory")

        monkeypatch.setattr("batch_engine.start.parting", failing)
    with caplog.at_level("WARNING", logger="batch_engine"):
        assert not matches_generate(chat, started)
    assert "differ from plain generate's [0, 0, 0, 0, 0, 0, 0, 0] on the warm-up prompt" in caplog.text
    failed = "reading plain generate's scores where the engine parts from it failed"
    assert (failed in caplog.text) == (diagnosis == "fails")


def test_the_warm_up_check_says_where_the_engine_parts_and_whether_at_a_near_tie(
    chat: ChatModel, started: BatchEngine, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from concurrent.futures import Future
    from dataclasses import replace

    submit = started.submit

    def parting_at_3(*args: Any, **kwargs: Any) -> Future[Any]:
        done = submit(*args, **kwargs).result(timeout=600)
        ids = list(done.ids)
        ids[3] = (ids[3] + 1) % chat.model.config.vocab_size  # another token than plain generate's best
        parted: Future[Any] = Future()
        parted.set_result(replace(done, ids=ids))
        return parted

    monkeypatch.setattr(started, "submit", parting_at_3)
    with caplog.at_level("WARNING", logger="batch_engine"):
        assert not matches_generate(chat, started)
    assert "on the warm-up prompt (torch.float32): they part at token 3, where plain generate's best score is" in (
        caplog.text
    )
    assert "not a near-tie: the engine computes something else than plain generate" in caplog.text


def test_a_parting_is_a_near_tie_within_four_steps_of_the_dtype_at_the_scores_magnitude() -> None:
    import math

    import torch

    from batch_engine.start import FLOOR_STEP, Parting

    bfloat16, float32 = torch.finfo(torch.bfloat16).eps, max(torch.finfo(torch.float32).eps, FLOOR_STEP)
    # plain's two best scores tied in bfloat16 (5.59375); the engine's token one step (1/32 at 4–8) below
    assert Parting(4, 5.59375, 5.5625, 2, bfloat16).near_tie
    assert Parting(4, 5.59375, 5.59375 - 4 / 32, 9, bfloat16).near_tie
    assert not Parting(4, 5.59375, 5.59375 - 5 / 32, 9, bfloat16).near_tie
    assert not Parting(4, 5.59375, 5.5625, 2, float32).near_tie, "in float32 that gap is a bug"
    assert Parting(4, 5.59375, 5.59375 - 4 * 2.0**-14, 2, float32).near_tie, "float32 judged at 2⁻¹⁶, not 2⁻²³"
    assert Parting(0, 4.02, 3.93, 1, bfloat16).near_tie, "the step at the larger score's magnitude (4–8: 1/32)"
    assert Parting(0, -0.5, -0.5 - 2 * 2.0**-8, 1, bfloat16).near_tie, "steps at 0.5–1: 2⁻⁸"
    assert Parting(0, 0.0, 0.0, 1, bfloat16).near_tie
    assert Parting(0, 1e-3, -1e-3, 1, bfloat16).near_tie is False
    for best, chosen in ((math.nan, 1.0), (math.inf, 1.0), (1.0, -math.inf)):
        assert not Parting(0, best, chosen, 1, bfloat16).near_tie
    assert "a near-tie, which the two attention paths may round either way" in str(
        Parting(4, 5.59375, 5.5625, 2, bfloat16)
    )


@pytest.mark.usefixtures("engine_out_of_memory")
async def test_an_engine_that_cannot_start_is_a_model_error_saying_what_to_lower(checkpoint: Path) -> None:
    with pytest.raises(ReasoningModelError, match="ORCH_REASONING__ENGINE_SLOTS") as caught:
        await load(checkpoint, slots=2)
    assert "2 slots of 256 tokens" in str(caught.value)
    assert "ORCH_REASONING__ENGINE=generate" in str(caught.value)


async def load(checkpoint: Path, **settings: Any) -> LocalReasoningBackend:
    batching = EngineSettings(**{"slots": 4, "max_tokens": 256, **settings})
    return await LocalReasoningBackend.load(str(checkpoint), device="cpu", dtype="float32", batching=batching)


def ask(question: str, budget: int = BUDGET, temperature: float = 0.0) -> ReasoningRequest:
    return ReasoningRequest((ChatMessage("user", question),), max_new_tokens=budget, temperature=temperature)


async def test_the_backend_on_the_engine_answers_as_plain_generate_and_runs_requests_together(
    checkpoint: Path,
) -> None:
    plain = await LocalReasoningBackend.load(str(checkpoint), device="cpu", dtype="float32")
    batched = await load(checkpoint)
    try:
        assert plain.engine is None
        assert batched.engine is not None
        expected = [await plain.generate(ask(question)) for question in QUESTIONS]
        got = await asyncio.gather(*(batched.generate(ask(question)) for question in QUESTIONS))
        assert [(r.text, r.completion_tokens, r.finish_reason) for r in got] == [
            (r.text, r.completion_tokens, r.finish_reason) for r in expected
        ]
        assert batched.engine.stats().admitted == len(QUESTIONS) + 1  # the warm-up check is the first
        assert max(batched.engine.batch_sizes) > 1, "the requests ran together"
        assert "batching engine" in (await batched.health()).detail
    finally:
        await plain.aclose()
        await batched.aclose()


async def test_a_stream_on_the_engine_adds_up_to_the_answer(checkpoint: Path) -> None:
    backend = await load(checkpoint)
    try:
        whole = await backend.generate(ask(QUESTIONS[1]))
        deltas: list[ReasoningDelta] = [delta async for delta in backend.stream(ask(QUESTIONS[1]))]
        assert "".join(delta.text for delta in deltas) == whole.text
        assert len([delta for delta in deltas if delta.text]) > 1, "the answer arrived in pieces"
        assert (deltas[-1].finish_reason, deltas[-1].completion_tokens) == (whole.finish_reason, BUDGET)
    finally:
        await backend.aclose()


async def test_a_sampled_request_goes_through_plain_generate(checkpoint: Path) -> None:
    backend = await load(checkpoint)
    try:
        assert backend.engine is not None
        admitted = backend.engine.stats().admitted
        result = await backend.generate(ask(QUESTIONS[0], temperature=0.8))
        assert result.completion_tokens == BUDGET
        assert backend.engine.stats().admitted == admitted
    finally:
        await backend.aclose()


async def test_a_closed_stream_leaves_the_engine_and_frees_its_slot(checkpoint: Path) -> None:
    backend = await load(checkpoint)
    engine = backend.engine
    assert engine is not None
    try:
        stream = backend.stream(ask(QUESTIONS[2], budget=200))
        first = await anext(stream)
        assert first.text
        await stream.aclose()
        for _ in range(100):
            if engine.running == 0:
                break
            await asyncio.sleep(0.02)
        assert engine.running == 0
        assert engine.steps < 200, "the request left before its budget"
    finally:
        await backend.aclose()


async def test_a_prompt_longer_than_a_slot_is_rejected_naming_the_setting(checkpoint: Path) -> None:
    backend = await load(checkpoint)
    try:
        with pytest.raises(ReasoningRejected, match="ORCH_REASONING__ENGINE_MAX_TOKENS"):
            await backend.generate(ask(" ".join(["receipt"] * 300)))
    finally:
        await backend.aclose()


async def test_closing_fails_what_the_engine_still_runs_and_refuses_more(checkpoint: Path) -> None:
    backend = await load(checkpoint)
    running = asyncio.create_task(backend.generate(ask(QUESTIONS[3], budget=230)))
    await asyncio.sleep(0.05)
    await backend.aclose()
    with pytest.raises(ReasoningUnavailable):
        await running
    with pytest.raises(ReasoningUnavailable, match="closed"):
        await backend.generate(ask(QUESTIONS[0]))
    assert not (await backend.health()).ok


async def test_metrics_read_the_engine_through_the_wired_backend(checkpoint: Path) -> None:
    from prometheus_client import generate_latest

    from orchestrator.observability.metrics import Metrics, StateCollector
    from orchestrator.stage_settings import LocalReasoningSettings
    from orchestrator.stages.resilient import endpoint_statuses
    from orchestrator.wiring import build_reasoning

    settings = LocalReasoningSettings(
        model=str(checkpoint), dtype="float32", engine="batched", engine_slots=2, engine_max_tokens=512
    )
    backend = await build_reasoning(settings)
    try:
        await backend.generate(ask(QUESTIONS[0]))
        (status,) = endpoint_statuses(backend)
        assert status.engine is not None
        assert (status.engine.admitted, status.engine.running) == (2, 0)  # the load's check, then the request
        metrics = Metrics()
        metrics.registry.register(StateCollector(lambda: {"reasoning": endpoint_statuses(backend)}))
        text = generate_latest(metrics.registry).decode()
    finally:
        await backend.aclose()
    assert 'orchestrator_engine_admitted_total{endpoint="local",stage="reasoning"} 2.0' in text
    assert 'orchestrator_engine_recompile_limit_hits_total{endpoint="local",stage="reasoning"} 0.0' in text
    assert endpoint_statuses(backend)[0].engine is None  # closed


def test_the_settings_and_the_command_line_name_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_REASONING__ENGINE", "batched")
    monkeypatch.setenv("ORCH_REASONING__ENGINE_SLOTS", "8")
    settings: Any = Settings().reasoning
    assert settings.batching() == EngineSettings(slots=8, prefix_bytes=1024 << 20)
    monkeypatch.setenv("ORCH_REASONING__ENGINE_PREFIX_MB", "64")
    assert Settings().reasoning.batching().prefix_bytes == 64 << 20  # type: ignore[union-attr]
    monkeypatch.delenv("ORCH_REASONING__ENGINE")
    assert Settings().reasoning.batching() is None, "plain generate by default"  # type: ignore[union-attr]
    monkeypatch.setenv("ORCH_REASONING__ENGINE", "batched")
    monkeypatch.setenv("ORCH_REASONING__ENGINE_DECODE_KERNEL", "off")
    assert Settings().reasoning.batching().decode_kernel is False  # type: ignore[union-attr]
    monkeypatch.setenv("ORCH_REASONING__ENGINE_COMPILE_SHAPES", "dynamic")
    assert Settings().reasoning.batching().compile_shapes == "dynamic"  # type: ignore[union-attr]
    monkeypatch.setenv("ORCH_REASONING__ENGINE_LINEAR_KERNEL", "on")
    assert Settings().reasoning.batching().linear_kernel is True  # type: ignore[union-attr]
    args = _parser().parse_args(["serve", "--engine", "batched", "--engine-slots", "4", "--engine-decode-kernel", "on"])
    assert (args.engine, args.engine_slots, args.engine_prefix_mb) == ("batched", 4, 1024)
    assert engine_settings(args) == EngineSettings(slots=4, prefix_bytes=1024 << 20, decode_kernel=True)
    args = _parser().parse_args(["serve", "--engine", "batched", "--engine-compile-shapes", "dynamic"])
    assert engine_settings(args).compile_shapes == "dynamic"  # type: ignore[union-attr]
    args = _parser().parse_args(["serve", "--engine", "batched", "--engine-linear-kernel", "off"])
    assert engine_settings(args).linear_kernel is False  # type: ignore[union-attr]
    args = _parser().parse_args(["serve", "--engine", "batched", "--engine-attention-plans", "length"])
    assert engine_settings(args).attention_plans == "length"  # type: ignore[union-attr]
    monkeypatch.setenv("ORCH_REASONING__ENGINE_ATTENTION_PLANS", "length")
    assert Settings().reasoning.batching().attention_plans == "length"  # type: ignore[union-attr]
    args = _parser().parse_args(["serve", "--engine", "batched", "--engine-recurring-plans", "off"])
    assert engine_settings(args).recurring_plans is False  # type: ignore[union-attr]
    assert engine_settings(_parser().parse_args(["serve", "--engine", "batched"])).recurring_plans  # type: ignore[union-attr]
    monkeypatch.setenv("ORCH_REASONING__ENGINE_RECURRING_PLANS", "false")
    assert Settings().reasoning.batching().recurring_plans is False  # type: ignore[union-attr]
    args = _parser().parse_args(["serve", "--engine", "batched", "--engine-dependent-launch", "off"])
    assert engine_settings(args).dependent_launch is False  # type: ignore[union-attr]
    assert engine_settings(_parser().parse_args(["serve", "--engine", "batched"])).dependent_launch is None  # type: ignore[union-attr]
    monkeypatch.setenv("ORCH_REASONING__ENGINE_DEPENDENT_LAUNCH", "on")
    assert Settings().reasoning.batching().dependent_launch is True  # type: ignore[union-attr]
    args = _parser().parse_args(["serve", "--engine", "batched", "--engine-prefill-graphs", "off"])
    assert engine_settings(args).prefill_graphs is False  # type: ignore[union-attr]
    assert engine_settings(_parser().parse_args(["serve", "--engine", "batched"])).prefill_graphs is None  # type: ignore[union-attr]
    monkeypatch.setenv("ORCH_REASONING__ENGINE_PREFILL_GRAPHS", "on")
    assert Settings().reasoning.batching().prefill_graphs is True  # type: ignore[union-attr]
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--engine-dependent-launch", "maybe"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--engine-prefill-graphs", "maybe"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--engine-recurring-plans", "maybe"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--engine-compile-shapes", "static"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--engine-prefix-mb", "-1"])
    with pytest.raises(ValueError, match="compile_shapes must be automatic or dynamic, not 'static'"):
        EngineSettings(compile_shapes="static")
    with pytest.raises(ValueError, match="attention_plans must be power-of-two or length, not 'each'"):
        EngineSettings(attention_plans="each")


DESCRIPTION = " ".join(["the receipt says total 54 and the date is today"] * 8)
"""A long shared part of the prompts below, as the description is of a session's questions."""


def described(chat: ChatModel, question: str) -> list[int]:
    return chat.encode_chat(
        (ChatMessage("system", "you are a helpful assistant"), ChatMessage("user", f"{DESCRIPTION} {question}"))
    )


def test_a_follow_up_on_the_same_text_prefills_only_its_own_and_equals_a_cold_request(chat: ChatModel) -> None:
    first, follow_up = described(chat, "what is the total ?"), described(chat, "and who is it ?")
    shared = next(n for n, (a, b) in enumerate(zip(first, follow_up, strict=False)) if a != b)
    assert shared > 64, "the prompts share the description"
    cold = chat.complete(follow_up, max_new_tokens=BUDGET, temperature=0.0)
    engine = BatchEngine(chat.model, ENGINE, REFUSALS)
    opening = submit(engine, first)
    engine.run_until_idle()
    assert opening.result().reused_tokens == 0
    again = submit(engine, follow_up)
    engine.run_until_idle()
    reused = again.result()
    assert reused.ids == cold
    assert reused.reused_tokens == shared // 32 * 32, "the longest whole block the two share"
    assert engine.device.prefixes.hits == 1
    repeated = submit(engine, follow_up)  # the same prompt again: all of it but its last, partial block
    engine.run_until_idle()
    assert repeated.result().ids == cold
    assert repeated.result().reused_tokens == (len(follow_up) - 1) // 32 * 32


def test_a_text_sharing_a_later_part_but_not_its_beginning_reuses_nothing(chat: ChatModel) -> None:
    common = ids_of(chat, DESCRIPTION)[:96]
    start, other_start = ids_of(chat, "who is it ?"), ids_of(chat, "what is the total ?")
    first = (start * 40)[:32] + common
    second = (other_start * 40)[:32] + common  # the same blocks after the first: a prefix only if the first matches
    engine = BatchEngine(chat.model, ENGINE, REFUSALS)
    submit(engine, first)
    engine.run_until_idle()
    future = submit(engine, second)
    engine.run_until_idle()
    assert future.result().reused_tokens == 0
    assert future.result().ids == chat.complete(second, max_new_tokens=BUDGET, temperature=0.0)


def test_no_prefix_is_kept_when_its_store_has_no_room_and_another_text_finds_none(chat: ChatModel) -> None:
    none_kept = BatchEngine(chat.model, EngineSettings(slots=2, max_tokens=256, prefix_bytes=0), REFUSALS)
    for _ in range(2):
        future = submit(none_kept, described(chat, "what is the total ?"))
        none_kept.run_until_idle()
        assert future.result().reused_tokens == 0
    engine = BatchEngine(chat.model, ENGINE, REFUSALS)
    submit(engine, described(chat, "what is the total ?"))
    engine.run_until_idle()
    other = chat.encode_chat((ChatMessage("user", " ".join(["who is it ?"] * 20)),))
    future = submit(engine, other)
    engine.run_until_idle()
    assert future.result().reused_tokens == 0
    assert future.result().ids == chat.complete(other, max_new_tokens=BUDGET, temperature=0.0)


def test_the_text_gpu_benchmark_runs_its_scenarios_on_the_cpu() -> None:
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "bench.gpu_text", "--tiny", "--rounds", "1", "--clients", "2,3", "--check-float32"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=root, check=False)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "first 32 tokens equal to plain generate: yes" in finished.stdout
    assert "in float32, first 32 tokens equal to plain generate: yes" in finished.stdout
    for measure in (*ONE_REQUEST_ROWS, "3 concurrent, tokens/s", "follow-up"):
        assert f"| {measure}" in finished.stdout
    assert "follow-ups: 32 new tokens after 32–32 reused" in finished.stdout
