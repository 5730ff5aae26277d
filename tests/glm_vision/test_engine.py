"""The `glm` vision backend over the batching engine: starting it, answering as plain `generate`, batching, closing,
what it keys and how it is sized, its metrics and its check at load (a request its caller gives up:
`test_cancellation.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from batch_engine.settings import EngineSettings
from batch_engine.types import Completion
from tests.glm_vision.helpers import SMALL_ENGINE, queued, request, same, unstarted_backend
from vision_stage.errors import VisionRejected, VisionUnavailable
from vision_stage.glm import GlmVisionBackend
from vision_stage.glm_engine import GlmEngine
from vision_stage.types import DecodedImage, VisionRequest, VisionTask


async def test_load_starts_the_batching_engine_by_default_and_generate_on_request(checkpoint: Path) -> None:
    batched = await GlmVisionBackend.load(
        str(checkpoint), batching=EngineSettings(slots=2, max_tokens=512), max_new_tokens=4
    )
    plain = await GlmVisionBackend.load(str(checkpoint), batching=None, max_new_tokens=4)
    try:
        assert batched.engine.batch is not None
        # as given, the prefills' graphs decided at start (`auto`, the default: off on a CPU)
        assert batched.engine.batch.settings == EngineSettings(slots=2, max_tokens=512, prefill_graphs=False)
        assert plain.engine.batch is None
        assert (await batched.health()).detail.endswith("; batched, 2 slots (0 running, 0 waiting)")
        assert (await plain.health()).detail.endswith("; generate")
    finally:
        await batched.aclose()
        await plain.aclose()


@pytest.mark.usefixtures("engine_out_of_memory")
async def test_a_batching_engine_that_cannot_start_says_what_to_lower(checkpoint: Path) -> None:
    with pytest.raises(VisionUnavailable, match="ENGINE_SLOTS") as caught:
        await GlmVisionBackend.load(str(checkpoint), batching=EngineSettings(slots=2, max_tokens=512))
    assert "2 slots of 512 tokens" in str(caught.value)
    assert "OutOfMemoryError" in str(caught.value)


@pytest.mark.parametrize(
    ("task", "question", "thinking", "max_new_tokens"),
    [("caption", None, False, 8), ("answer", "what is the total?", False, 40), ("describe", "x?", True, 40)],
)
async def test_the_batched_engine_answers_as_plain_generate(
    engine: GlmEngine,
    batched_engine: GlmEngine,
    checkpoint: Path,
    task: VisionTask,
    question: str | None,
    thinking: bool,
    max_new_tokens: int,
) -> None:
    settings: dict[str, Any] = {"model": str(checkpoint), "device": "cpu", "thinking": thinking}
    plain = GlmVisionBackend(engine, **settings, max_new_tokens=max_new_tokens)
    batched = GlmVisionBackend(batched_engine, **settings, max_new_tokens=max_new_tokens)
    expected = await plain.generate(request(task, question))
    result = await batched.generate(request(task, question))
    assert same(result) == same(expected)
    assert result.completion_tokens > 0


async def test_concurrent_requests_are_batched_and_each_equals_its_sequential_answer(
    batched_engine: GlmEngine, checkpoint: Path
) -> None:
    _, batch, backend = unstarted_backend(batched_engine, checkpoint, 12)
    requests = [request("answer", f"question {n}?", width=64 + 16 * n) for n in range(6)]  # more than the 4 slots
    tasks = [asyncio.create_task(backend.generate(one)) for one in requests]
    await queued(batch, len(requests))  # all submitted while nothing runs: nothing serialised them
    batch.start()
    try:
        together = await asyncio.gather(*tasks)
        one_by_one = [await backend.generate(one) for one in requests]
    finally:
        await backend.aclose()
    assert [same(result) for result in together] == [same(result) for result in one_by_one]
    assert max(batch.batch_sizes) >= 2


async def test_aclose_closes_the_batching_engine(batched_engine: GlmEngine, checkpoint: Path) -> None:
    glm, batch, backend = unstarted_backend(batched_engine, checkpoint, 4)
    waiting = asyncio.create_task(backend.generate(request()))
    await queued(batch, 1)
    await backend.aclose()
    with pytest.raises(VisionUnavailable, match="closed"):
        await waiting  # the engine failed what it held
    with pytest.raises(VisionUnavailable, match="closed"):
        await backend.generate(request())
    with pytest.raises(VisionUnavailable, match="closed"):
        batch.submit(glm.codec.encode(request(), thinking=False).inputs, image_key=None, max_new_tokens=4)
    assert not (await backend.health()).ok


async def test_a_prompt_longer_than_a_slot_is_rejected_and_an_answer_is_cut_at_the_slot_s_end(
    batched_engine: GlmEngine, checkpoint: Path
) -> None:
    backend = GlmVisionBackend(batched_engine, model=str(checkpoint), device="cpu", max_new_tokens=8)
    with pytest.raises(VisionRejected, match="ORCH_VISION__ENGINE_MAX_TOKENS"):
        await backend.generate(request(question="total " * SMALL_ENGINE.max_tokens))
    base = batched_engine.codec.encode(request(question="total"), thinking=False).prompt_tokens
    near_the_end = request(question="total" + " total" * (SMALL_ENGINE.max_tokens - 3 - base))
    result = await backend.generate(near_the_end)
    assert (result.prompt_tokens, result.completion_tokens) == (SMALL_ENGINE.max_tokens - 3, 3)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (RuntimeError("CUDA error: device-side assert triggered"), VisionUnavailable),
        (torch.OutOfMemoryError("CUDA out of memory"), VisionUnavailable),
        (ValueError("Image features and image tokens do not match"), VisionRejected),
        (VisionUnavailable("the glm batching engine was closed"), VisionUnavailable),
    ],
)
async def test_what_the_engine_fails_with_is_translated(
    batched_engine: GlmEngine, checkpoint: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, expected: type
) -> None:
    failed: Future[Completion] = Future()
    failed.set_exception(error)
    assert batched_engine.batch is not None
    monkeypatch.setattr(batched_engine.batch, "submit", lambda *args, **kwargs: failed)
    backend = GlmVisionBackend(batched_engine, model=str(checkpoint), device="cpu", max_new_tokens=4)
    with pytest.raises(expected) as caught:
        await backend.generate(request())
    assert type(caught.value) is expected
    assert caught.value is error or type(error).__name__ in str(caught.value)


async def test_the_image_s_content_hash_keys_the_engine(
    batched_engine: GlmEngine, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = batched_engine.batch
    assert batch is not None
    keys: list[str | None] = []
    submit = batch.submit

    def spy(inputs: Any, *, image_key: str | None, **options: Any) -> Future[Completion]:
        keys.append(image_key)
        return submit(inputs, image_key=image_key, **options)

    monkeypatch.setattr(batch, "submit", spy)
    backend = GlmVisionBackend(batched_engine, model=str(checkpoint), device="cpu", max_new_tokens=4)
    hashed = DecodedImage(Image.new("RGB", (64, 48), "white"), "PNG", 64, 48, 0, "ab" * 32)
    hits = batch.device.prefixes.hits
    await backend.generate(VisionRequest(hashed, "what is the total?", task="answer"))
    await backend.generate(VisionRequest(hashed, "and the date?", task="answer"))
    await backend.generate(request())  # no hash: nothing to key
    assert keys == ["ab" * 32, "ab" * 32, None]
    assert batch.device.prefixes.hits == hits + 1  # the follow-up reused the image's prefix


async def test_the_vision_stage_command_line_chooses_and_sizes_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    from vision_stage.__main__ import _load, _parser

    calls: list[dict[str, Any]] = []

    async def load(model: str, **kwargs: Any) -> Any:
        calls.append(kwargs)

    monkeypatch.setattr(GlmVisionBackend, "load", load)
    parser = _parser()
    await _load(parser.parse_args(["serve", "--backend", "glm", "--model", "m"]))
    options = ["--engine-slots", "4", "--engine-max-tokens", "2048", "--engine-queue", "8", "--engine-prefix-mb", "0"]
    options += ["--no-cuda-graphs", "--engine-compile", "off", "--engine-prefill-tokens", "512"]
    options += ["--engine-decode-kernel", "off", "--engine-linear-kernel", "on"]
    await _load(parser.parse_args(["serve", "--backend", "glm", "--model", "m", *options]))
    await _load(parser.parse_args(["serve", "--backend", "glm", "--model", "m", "--engine", "generate"]))
    sized = EngineSettings(
        slots=4,
        max_tokens=2048,
        queue_size=8,
        prefix_bytes=0,
        cuda_graphs=False,
        compile=False,
        prefill_tokens=512,
        decode_kernel=False,
        linear_kernel=True,
    )
    assert [call["batching"] for call in calls] == [EngineSettings(), sized, None]
    wrongs = (["--engine", "vllm"], ["--engine-slots", "0"], ["--engine-slots", "129"], ["--engine-queue", "x"])
    for wrong in (*wrongs, ["--engine-decode-kernel", "yes"], ["--engine-linear-kernel", "cublas"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", "--backend", "glm", "--model", "m", *wrong])


def test_engine_settings_are_bounded() -> None:
    wrongs: tuple[tuple[dict[str, Any], str], ...] = (
        ({"slots": 0}, "slots must be from 1 to 128, not 0"),
        ({"slots": 129}, "slots"),
        ({"max_tokens": 255}, "max_tokens must be at least 256"),
        ({"queue_size": 0}, "queue_size"),
        ({"prefix_bytes": -1}, "prefix_bytes"),
        ({"prefill_tokens": 0}, "prefill_tokens"),
    )
    for wrong, message in wrongs:
        with pytest.raises(ValueError, match=message):
            EngineSettings(**wrong)


async def test_metrics_read_the_batching_engine_through_the_wired_backend(checkpoint: Path) -> None:
    from prometheus_client import generate_latest

    from orchestrator.observability.metrics import Metrics, StateCollector
    from orchestrator.stage_settings import GlmVisionSettings
    from orchestrator.stages.resilient import endpoint_statuses
    from orchestrator.wiring import build_vision

    settings = GlmVisionSettings(model=str(checkpoint), engine_slots=2, engine_max_tokens=512, max_new_tokens=4)
    backend = await build_vision(settings)
    try:
        picture = DecodedImage(Image.new("RGB", (64, 48), "white"), "PNG", 64, 48, 0, "c0ffee")
        await backend.generate(VisionRequest(picture, "what is the total?", task="answer"))
        await backend.generate(VisionRequest(picture, "and the date?", task="answer"))  # its prefix is reused
        (status,) = endpoint_statuses(backend)
        assert status.engine is not None
        # the load's check against plain generate, then the two requests
        assert (status.engine.admitted, status.engine.prefix_hits, status.engine.running) == (3, 1, 0)
        metrics = Metrics()
        metrics.registry.register(StateCollector(lambda: {"vision": endpoint_statuses(backend)}))
        text = generate_latest(metrics.registry).decode()
    finally:
        await backend.aclose()
    labels = 'endpoint="glm",stage="vision"'
    assert f"orchestrator_engine_admitted_total{{{labels}}} 3.0" in text
    assert 'orchestrator_engine_reuse_total{endpoint="glm",result="hit",stage="vision",store="prefix"} 1.0' in text
    assert f'orchestrator_engine_requests{{{labels},state="running"}} 0.0' in text
    assert f"orchestrator_engine_steps_total{{{labels}}}" in text
    assert f"orchestrator_engine_encoder_graph_replays_total{{{labels}}} 0.0" in text, "nothing is captured on a CPU"
    assert endpoint_statuses(backend)[0].engine is None  # closed


async def test_load_checks_the_batching_engine_against_plain_generate(
    checkpoint: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    with caplog.at_level("WARNING", logger="vision_stage.glm"):
        backend = await GlmVisionBackend.load(str(checkpoint), batching=EngineSettings(slots=2, max_tokens=512))
    try:
        assert not caplog.records
        engine = backend.engine
        assert await asyncio.to_thread(engine.check_batching)
        monkeypatch.setattr(engine, "generate_ids", lambda prompt, tokens: [0] * tokens)
        with caplog.at_level("WARNING", logger="vision_stage.glm"):
            assert not await asyncio.to_thread(engine.check_batching)
        assert "differ from plain generate's [0, 0, 0, 0, 0, 0, 0, 0]" in caplog.text
    finally:
        await backend.aclose()


async def test_with_compiled_layers_the_check_at_load_compiles_only_what_requests_run(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check's plain `generate` runs eagerly beside compiled layers (nothing else calls it when the engine
    serves), while the engine's part of the check compiles its image prefill: the first request compiles nothing.
    The encoder's blocks compile with the model's ints constants (`batch_engine.compiling.encoder_settings`): no
    symbol for a module's head count, which its fused rotary kernel would divide by."""
    from torch._dynamo.utils import counters

    compiled: list[int] = []
    generate_ids = GlmEngine.generate_ids

    def counted(self: GlmEngine, prompt: Any, tokens: int) -> list[int]:
        before = counters["stats"]["unique_graphs"]
        ids = generate_ids(self, prompt, tokens)
        compiled.append(counters["stats"]["unique_graphs"] - before)
        return ids

    monkeypatch.setattr(GlmEngine, "generate_ids", counted)
    settings = EngineSettings(slots=2, max_tokens=512, compile=True)
    with _symbols_created() as symbols:
        backend = await GlmVisionBackend.load(str(checkpoint), batching=settings, max_new_tokens=4)
    try:
        assert compiled == [0, 0], "the warm-up before compiling, then the check: plain generate compiled nothing"
        assert any("['cu_seqlens']" in symbol for symbol in symbols), "the encoder compiled with dynamic shapes"
        assert not [symbol for symbol in symbols if "num_heads" in symbol]
        before = counters["stats"]["unique_graphs"]
        assert (await backend.generate(request())).answer
        assert counters["stats"]["unique_graphs"] == before, "the first request compiled at request time"
    finally:
        await backend.aclose()
        torch._dynamo.reset()  # its compiled versions would count against other tests' recompile limit


def test_the_compiled_encoder_keeps_the_model_s_ints_constant_whoever_calls_it() -> None:
    """Dynamo keeps no guard on `allow_unspec_int_on_nn_module`, so `compile_model` makes the encoder's setting its
    own (`trace_with_constant_ints`): called directly, on a thread with the engine's settings (the ints on modules
    symbolic, for the decoder), its blocks still trace with the head count constant."""
    from batch_engine.compiling import DYNAMO_SETTINGS, compile_model
    from batch_engine.vision_attention import register_vision_attention
    from tests.tiny_glm4v import glm_tokenizer, tiny_glm4v_model

    model = tiny_glm4v_model(glm_tokenizer()).eval()
    register_vision_attention(model)
    config = model.config.vision_config
    grid = torch.tensor([[1, 8, 8]])
    pixels = torch.randn((64, config.in_channels * config.temporal_patch_size * config.patch_size**2))
    try:
        with torch._dynamo.config.patch(DYNAMO_SETTINGS), _symbols_created() as symbols, torch.inference_mode():
            compile_model(model, model.model.language_model)
            model.model.get_image_features(pixels, image_grid_thw=grid, return_dict=True)
    finally:
        torch._dynamo.reset()  # its compiled versions would count against other tests' recompile limit
    assert any("['cu_seqlens']" in symbol for symbol in symbols), "the encoder compiled with dynamic shapes"
    assert not [symbol for symbol in symbols if "num_heads" in symbol]


@contextlib.contextmanager
def _symbols_created() -> Iterator[list[str]]:
    """What dynamo made symbolic while the block ran, from any thread ("create_symbol s3 = 2 for L['self']...")."""
    records: list[str] = []

    class Recording(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if (message := record.getMessage()).startswith("create_symbol"):
                records.append(message)

    logger, handler = logging.getLogger("torch.fx.experimental.symbolic_shapes"), Recording()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
