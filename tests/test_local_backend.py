"""The `local` backend on tiny random checkpoints (Llama- and GLM-4-shaped) and on the packaged SmolLM2."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from jinja2 import TemplateError

from reasoning_stage.backend import ReasoningBackend, StreamingReasoningBackend
from reasoning_stage.chat_model import Phase, translate_error
from reasoning_stage.embedded import CACHE_NAME, EMBEDDED_MODEL
from reasoning_stage.errors import (
    ReasoningError,
    ReasoningModelError,
    ReasoningRejected,
    ReasoningUnavailable,
)
from reasoning_stage.local import LocalReasoningBackend
from reasoning_stage.types import ChatMessage, ReasoningDelta, ReasoningRequest, ReasoningResult
from tests.tiny_models import build_tiny_glm4, build_tiny_llama

QUESTION = (
    ChatMessage("system", "you are a helpful assistant"),
    ChatMessage("user", "what is the total of this receipt ?"),
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_glm4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_glm4(tmp_path_factory.mktemp("tiny-glm4"), stops="never")


def _prompt_tokens(path: Path, messages: tuple[ChatMessage, ...]) -> int:
    """Count the chat-templated prompt independently of the backend."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    ids = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages], add_generation_prompt=True, return_dict=False
    )
    assert isinstance(ids, list)
    return len(ids)


@pytest.mark.parametrize(
    ("builder", "architecture"),
    [
        (build_tiny_llama, "LlamaForCausalLM"),
        (build_tiny_glm4, "Glm4ForCausalLM"),
        (functools.partial(build_tiny_glm4, architecture="glm"), "GlmForCausalLM"),
    ],
    ids=["llama", "glm4", "glm"],
)
async def test_tiny_model_generates_deterministically_within_budget(
    tmp_path: Path, builder: Callable[..., Path], architecture: str
) -> None:
    path = builder(tmp_path, stops="never")
    backend = await LocalReasoningBackend.load(str(path))
    assert isinstance(backend, ReasoningBackend)
    assert (backend.name, backend.model, backend.architecture) == ("local", str(path), architecture)
    assert (await backend.health()).ok

    request = ReasoningRequest(messages=QUESTION, max_new_tokens=6)
    first, second = await backend.generate(request), await backend.generate(request)

    assert isinstance(first, ReasoningResult)
    assert isinstance(first.text, str)
    assert dataclasses.replace(second, latency_ms=first.latency_ms) == first
    assert first.prompt_tokens == _prompt_tokens(path, QUESTION)
    assert first.completion_tokens == 6
    assert first.finish_reason == "length"
    assert first.latency_ms > 0


async def test_sampling_also_respects_the_budget(tiny_llama: Path) -> None:
    backend = await LocalReasoningBackend.load(str(tiny_llama))
    result = await backend.generate(ReasoningRequest(messages=QUESTION, max_new_tokens=5, temperature=0.9))
    assert 1 <= result.completion_tokens <= 5
    assert result.finish_reason in ("stop", "length")


async def test_an_end_of_sequence_token_finishes_with_stop(tmp_path: Path) -> None:
    backend = await LocalReasoningBackend.load(str(build_tiny_llama(tmp_path, stops="at_once")))
    result = await backend.generate(ReasoningRequest(messages=QUESTION, max_new_tokens=8))
    assert (result.completion_tokens, result.finish_reason) == (1, "stop")


async def test_the_budget_shrinks_to_the_room_left_in_the_context(tmp_path: Path) -> None:
    path = build_tiny_llama(tmp_path, max_position_embeddings=24, stops="never")
    backend = await LocalReasoningBackend.load(str(path))
    prompt_tokens = _prompt_tokens(path, QUESTION)
    result = await backend.generate(ReasoningRequest(messages=QUESTION, max_new_tokens=50))
    assert result.completion_tokens == 24 - prompt_tokens
    assert result.finish_reason == "length"


async def test_a_prompt_longer_than_the_context_is_rejected(tmp_path: Path) -> None:
    backend = await LocalReasoningBackend.load(str(build_tiny_llama(tmp_path, max_position_embeddings=24)))
    long_question = ChatMessage("user", "what is the total of this receipt ? " * 10)
    with pytest.raises(ReasoningRejected, match="at most 24"):
        await backend.generate(ReasoningRequest(messages=(long_question,), max_new_tokens=4))
    assert (await backend.health()).ok  # a refused request leaves the model usable


@pytest.mark.parametrize(
    "request_",
    [
        ReasoningRequest(messages=(), max_new_tokens=4),
        ReasoningRequest(messages=QUESTION, max_new_tokens=0),
        ReasoningRequest(messages=QUESTION, temperature=-1.0),
        ReasoningRequest(messages=QUESTION, temperature=float("nan")),
    ],
    ids=["no-messages", "zero-budget", "negative-temperature", "nan-temperature"],
)
async def test_malformed_requests_are_rejected(tiny_llama: Path, request_: ReasoningRequest) -> None:
    backend = await LocalReasoningBackend.load(str(tiny_llama))
    with pytest.raises(ReasoningRejected):
        await backend.generate(request_)


async def test_the_event_loop_keeps_ticking_during_generation(tiny_glm4: Path) -> None:
    backend = await LocalReasoningBackend.load(str(tiny_glm4))
    ticks = 0
    done = asyncio.Event()

    async def tick() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)  # let the ticker start before generation
    before = ticks
    result = await backend.generate(ReasoningRequest(messages=QUESTION, max_new_tokens=120))
    during = ticks - before
    done.set()
    await ticker
    assert result.completion_tokens >= 32  # random weights fall into a loop, which stops generation early
    assert during >= 10, f"only {during} ticks in {result.latency_ms:.0f} ms of generation"


async def test_concurrent_generations_all_answer_alike(tiny_llama: Path) -> None:
    backend = await LocalReasoningBackend.load(str(tiny_llama))
    request = ReasoningRequest(messages=QUESTION, max_new_tokens=8)
    alone = await backend.generate(request)
    together = await asyncio.gather(*(backend.generate(request) for _ in range(3)))
    assert {(r.text, r.completion_tokens) for r in together} == {(alone.text, alone.completion_tokens)}


async def test_a_closed_backend_is_unhealthy_and_unavailable(tiny_llama: Path) -> None:
    backend = await LocalReasoningBackend.load(str(tiny_llama))
    await backend.aclose()
    assert not (await backend.health()).ok
    with pytest.raises(ReasoningUnavailable):
        await backend.generate(ReasoningRequest(messages=QUESTION, max_new_tokens=2))


async def test_a_missing_path_is_a_model_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ReasoningModelError, match="no-such-model") as caught:
        await LocalReasoningBackend.load(str(missing))
    assert "directory" in str(caught.value)


async def test_a_model_without_chat_template_is_a_model_error(tmp_path: Path) -> None:
    path = build_tiny_llama(tmp_path, chat_template=None)
    with pytest.raises(ReasoningModelError, match="chat template"):
        await LocalReasoningBackend.load(str(path))


async def test_an_unwritable_model_cache_is_a_model_error_saying_what_to_do(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "cache"
    not_a_directory.write_text("a file where the cache directory should be")
    with pytest.raises(ReasoningModelError, match="cache directory") as caught:
        await LocalReasoningBackend.load(None, cache_dir=not_a_directory)
    assert str(not_a_directory) in str(caught.value)


@pytest.mark.parametrize("dtype", ["float13", "float64"])  # float64: torch's, but not one the stage runs in
async def test_an_unknown_dtype_is_a_model_error(tiny_llama: Path, dtype: str) -> None:
    with pytest.raises(ReasoningModelError, match=f"unknown dtype '{dtype}'"):
        await LocalReasoningBackend.load(str(tiny_llama), dtype=dtype)


FOREIGN_ERRORS: list[tuple[Phase, Exception, type[ReasoningError]]] = [
    ("load", OSError("no file named config.json"), ReasoningModelError),
    ("load", ValueError("Unrecognized configuration class"), ReasoningModelError),
    ("load", ImportError("gguf is not installed"), ReasoningModelError),
    ("load", KeyError("model_type"), ReasoningModelError),
    ("load", RuntimeError("size mismatch"), ReasoningModelError),
    ("generate", ValueError("bad generation flag"), ReasoningRejected),
    ("generate", TemplateError("Conversation roles must alternate"), ReasoningRejected),
    ("generate", RuntimeError("CUDA out of memory"), ReasoningUnavailable),
    ("generate", IndexError("index out of range in self"), ReasoningUnavailable),
]


@pytest.mark.parametrize(("phase", "foreign", "expected"), FOREIGN_ERRORS)
def test_foreign_errors_are_translated_into_the_tree(
    phase: Phase, foreign: Exception, expected: type[ReasoningError]
) -> None:
    translated = translate_error(foreign, phase=phase, model="some/model")
    assert type(translated) is expected
    assert "some/model" in str(translated)


@pytest.mark.parametrize("phase", ["load", "generate"])
def test_our_own_errors_pass_through_translation(phase: Phase) -> None:
    ours = ReasoningRejected("too long")
    assert translate_error(ours, phase=phase, model="m") is ours


def test_torch_out_of_memory_counts_as_unavailable() -> None:
    import torch

    translated = translate_error(torch.OutOfMemoryError("out of memory"), phase="generate", model="m")
    assert isinstance(translated, ReasoningUnavailable)


# --- the packaged SmolLM2-135M-Instruct (real weights, ~20 s to convert once per session) ---

RECEIPT_CHAT = (
    ChatMessage(
        "system",
        "You answer questions about an image you cannot see. A vision model has described it. "
        "Answer briefly from the description.",
    ),
    ChatMessage(
        "user",
        "<image_description>\nA shop receipt. GREEN LEAF CAFE. Latte 4.50. Club sandwich 12.95. "
        "Salad 9.80. Cheesecake 6.20. Sparkling water 3.50. Subtotal 49.60. Tax 4.46. TOTAL 54.06. "
        "Paid by card.\n</image_description>\n\nQuestion: What is the total?",
    ),
)


@dataclass(frozen=True)
class FirstLoad:
    cache_dir: Path
    copy_existed: bool
    source: str
    converted: bool
    load_seconds: float


@pytest.fixture(scope="session")
def smollm2_first_load(embedded_model_cache: Path) -> FirstLoad:
    """Load the embedded model into the session's shared cache, keeping only what the load reported.

    The cache is shared with other tests so the GGUF is converted once per run; whoever loads first converts.
    """
    copy_existed = (embedded_model_cache / CACHE_NAME).exists()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        backend = asyncio.run(LocalReasoningBackend.load(None, cache_dir=embedded_model_cache))
    return FirstLoad(embedded_model_cache, copy_existed, backend.source, backend.converted, backend.load_seconds)


@pytest.mark.slow
def test_first_embedded_load_converts_into_the_cache(smollm2_first_load: FirstLoad) -> None:
    expected = smollm2_first_load.cache_dir / CACHE_NAME
    assert smollm2_first_load.converted is not smollm2_first_load.copy_existed
    assert smollm2_first_load.source == str(expected)
    assert (expected / "config.json").is_file()
    assert any(expected.glob("*.safetensors"))
    # Written atomically: only the finished copy is left, no staging directory.
    assert [p.name for p in smollm2_first_load.cache_dir.iterdir() if CACHE_NAME in p.name] == [CACHE_NAME]
    if smollm2_first_load.converted:
        print(f"\nSmolLM2 first load (GGUF conversion included): {smollm2_first_load.load_seconds:.1f} s")


@pytest.mark.slow
async def test_second_embedded_load_reads_the_cache_and_answers(smollm2_first_load: FirstLoad) -> None:
    backend = await LocalReasoningBackend.load(None, cache_dir=smollm2_first_load.cache_dir)
    assert (backend.model, backend.converted) == (EMBEDDED_MODEL, False)
    assert backend.source == str(smollm2_first_load.cache_dir / CACHE_NAME)  # not the GGUF's package directory

    started = time.perf_counter()
    result = await backend.generate(ReasoningRequest(messages=RECEIPT_CHAT, max_new_tokens=32))
    seconds = time.perf_counter() - started
    print(
        f"\nSmolLM2 cached load {backend.load_seconds:.2f} s (first load {smollm2_first_load.load_seconds:.1f} s); "
        f"{result.completion_tokens} tokens in {seconds:.2f} s ({result.completion_tokens / seconds:.1f} tokens/s); "
        f"answered {result.text!r}"
    )
    assert result.model == EMBEDDED_MODEL
    assert result.finish_reason == "stop"
    assert 0 < result.completion_tokens <= 32
    assert result.prompt_tokens > 50
    assert "54.06" in result.text


# --- streaming ---


async def _collect(backend: LocalReasoningBackend, request: ReasoningRequest) -> list[ReasoningDelta]:
    return [delta async for delta in backend.stream(request)]


@pytest.mark.parametrize("builder", [build_tiny_llama, build_tiny_glm4], ids=["llama", "glm4"])
async def test_streamed_deltas_add_up_to_the_generated_answer(tmp_path: Path, builder: Callable[..., Path]) -> None:
    backend = await LocalReasoningBackend.load(str(builder(tmp_path, stops="never")))
    assert isinstance(backend, StreamingReasoningBackend)
    request = ReasoningRequest(messages=QUESTION, max_new_tokens=16)
    result = await backend.generate(request)
    deltas = await _collect(backend, request)

    assert "".join(delta.text for delta in deltas) == result.text
    assert len([delta for delta in deltas if delta.text]) > 1  # piece by piece, not the answer in one lump
    assert all(delta.finish_reason is None for delta in deltas[:-1])
    last = deltas[-1]
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("length", result.prompt_tokens, 16)


async def test_a_stream_that_ends_at_once_still_says_why(tmp_path: Path) -> None:
    backend = await LocalReasoningBackend.load(str(build_tiny_llama(tmp_path, stops="at_once")))
    request = ReasoningRequest(messages=QUESTION, max_new_tokens=8)
    result, deltas = await backend.generate(request), await _collect(backend, request)
    assert "".join(delta.text for delta in deltas) == result.text
    assert (deltas[-1].finish_reason, deltas[-1].completion_tokens) == ("stop", 1)


@pytest.mark.parametrize(
    "request_",
    [ReasoningRequest(messages=(), max_new_tokens=4), ReasoningRequest(messages=(QUESTION[1],) * 40, max_new_tokens=4)],
    ids=["no-messages", "prompt-too-long"],
)
async def test_a_refused_stream_raises_before_its_first_delta(tiny_llama: Path, request_: ReasoningRequest) -> None:
    backend = await LocalReasoningBackend.load(str(tiny_llama))
    with pytest.raises(ReasoningRejected):
        await anext(backend.stream(request_))


@dataclass
class DecodingSteps:
    count: int = 0
    third: threading.Event = field(default_factory=threading.Event)


@contextmanager
def counting_decoding_steps(architecture: str) -> Iterator[DecodingSteps]:
    """Count forward passes of the model class named `architecture` (one per decoding step), through torch's global
    module hook; `third` is set at the third."""
    from torch.nn.modules.module import register_module_forward_hook

    steps = DecodingSteps()

    def count(module: object, *_: object) -> None:
        if type(module).__name__ == architecture:
            steps.count += 1
            if steps.count >= 3:
                steps.third.set()

    handle = register_module_forward_hook(count)
    try:
        yield steps
    finally:
        handle.remove()


async def test_closing_a_stream_stops_the_generation(tiny_llama: Path) -> None:
    backend = await LocalReasoningBackend.load(str(tiny_llama))
    with counting_decoding_steps("LlamaForCausalLM") as steps:
        stream = backend.stream(ReasoningRequest(messages=QUESTION, max_new_tokens=200))
        await anext(stream)
        await stream.aclose()  # returns once the worker thread has stopped
        stopped_at = steps.count
        await asyncio.sleep(0.2)
        assert steps.count == stopped_at < 50
    assert (await backend.generate(ReasoningRequest(messages=QUESTION, max_new_tokens=3))).completion_tokens == 3


async def test_cancelling_a_generation_stops_its_thread(tiny_llama: Path) -> None:
    backend = await LocalReasoningBackend.load(str(tiny_llama))
    with counting_decoding_steps("LlamaForCausalLM") as steps:
        task = asyncio.create_task(backend.generate(ReasoningRequest(messages=QUESTION, max_new_tokens=200)))
        assert await asyncio.to_thread(steps.third.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task  # returns once the worker thread has stopped
        stopped_at = steps.count
        await asyncio.sleep(0.2)
        assert steps.count == stopped_at < 50


async def test_a_closed_backend_refuses_to_stream(tiny_llama: Path) -> None:
    backend = await LocalReasoningBackend.load(str(tiny_llama))
    await backend.aclose()
    with pytest.raises(ReasoningUnavailable):
        await anext(backend.stream(ReasoningRequest(messages=QUESTION, max_new_tokens=2)))
