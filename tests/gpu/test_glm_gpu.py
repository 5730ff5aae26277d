"""The `glm` backend on a CUDA GPU: GLM-4.6V-Flash's full architecture with random weights, and real weights when a
checkpoint directory is given.

    .venv/bin/python -m pytest -m gpu tests/gpu -q
    GLM_VISION_MODEL=/models/GLM-4.6V-Flash .venv/bin/python -m pytest -m gpu tests/gpu -q   # real weights too

Never runs in CI: the `gpu` marker is deselected by default, and every test is skipped without CUDA. The full-size
model takes about 21 GB of GPU memory in bfloat16.
"""

from __future__ import annotations

import asyncio
import copy
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from batch_engine.attention_plans import plan_by_power_of_two
from batch_engine.compiling import recompile_limit_hits, watch_recompile_limit
from batch_engine.engine import BatchEngine
from batch_engine.images import encode_images, place_images
from batch_engine.settings import EngineSettings
from batch_engine.start import parting, started
from batch_engine.vision_attention import register_vision_attention
from tests.tiny_glm4v import CONTROL_TOKENS, MARKUP_TOKENS, full_size_glm46v_flash
from vision_stage.errors import VisionUnavailable
from vision_stage.glm import GlmVisionBackend
from vision_stage.glm_codec import MAX_VISUAL_TOKENS, GlmCodec
from vision_stage.glm_engine import REFUSALS, GlmEngine, warm_up_request
from vision_stage.images import ImageLimits, decode_image
from vision_stage.types import DecodedImage, VisionRequest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
RECEIPT = Path(__file__).resolve().parents[1] / "fixtures" / "receipt.png"


def square(side: int, sha256: str = "") -> DecodedImage:
    """A grey ramp; `sha256` stands for its file's content hash (empty: the engine keeps nothing of it)."""
    ramp = Image.linear_gradient("L").resize((side, side))
    return DecodedImage(Image.merge("RGB", (ramp, ramp, ramp)), "PNG", side, side, 0, sha256)


@pytest.fixture(scope="module")
def engine() -> GlmEngine:
    """The full-size model with random weights, its attention planned as the service plans it (cuDNN's plans per
    power of two of the lengths, `EngineSettings.attention_plans`'s default): asked before any attention in this
    process, since PyTorch reads the choice once."""
    plan_by_power_of_two()
    torch.manual_seed(0)
    model, processor = full_size_glm46v_flash("cuda", torch.bfloat16)
    engine = GlmEngine(model, GlmCodec(processor), name="random GLM-4.6V-Flash")
    suppressed = engine.codec.tokenizer.convert_tokens_to_ids([*CONTROL_TOKENS, *MARKUP_TOKENS])
    model.generation_config.suppress_tokens = suppressed  # random weights: plain words only, never an empty answer
    return engine


@pytest.fixture
def backend(engine: GlmEngine) -> GlmVisionBackend:
    return GlmVisionBackend(engine, model="random GLM-4.6V-Flash", device="cuda", max_new_tokens=8)


def test_images_are_processed_on_the_gpu_into_the_same_patches(engine: GlmEngine) -> None:
    asked = VisionRequest(square(1024), "What is written on the sign?", task="answer")
    on_cpu = engine.codec.encode(asked, thinking=False)
    on_gpu = GlmCodec(engine.codec.processor, image_device="cuda").encode(asked, thinking=False)
    pixels = on_gpu.inputs["pixel_values"]
    assert pixels.device.type == "cuda"
    assert (on_gpu.grid, on_gpu.inputs["input_ids"].tolist()) == (on_cpu.grid, on_cpu.inputs["input_ids"].tolist())
    # The two devices' resizing kernels round apart; the normalised pixels agree closely on average.
    assert float((pixels.cpu() - on_cpu.inputs["pixel_values"]).abs().mean()) < 0.02


def test_the_packed_vision_attention_encodes_as_closely_as_sdpa_does(engine: GlmEngine) -> None:
    """With cuDNN's plans per power of two (the service's), the packed attention's calls are laid out for them and
    transformers' `sdpa` path's are not (PyTorch falls back to a plan of their own lengths), so the two round apart in
    bfloat16. The packed encoding is as close to a float32 encoding as `sdpa`'s (its mean error at most 1.05× that
    of `sdpa`; on an H100 both 0.01576 against a mean magnitude of 0.737), and the same to the bit when run again."""
    model: Any = engine.model
    asked = VisionRequest(square(1024), "What is written on the sign?", task="answer")
    inputs = engine.codec.encode(asked, thinking=False).inputs
    pixels, grid = inputs["pixel_values"].to("cuda"), inputs["image_grid_thw"].to("cuda")

    def encode(values: torch.Tensor) -> torch.Tensor:
        features = model.model.get_image_features(values, image_grid_thw=grid, return_dict=True)
        first: torch.Tensor = features.pooler_output[0]
        return first.float()

    visual = model.model.visual
    in_float32 = copy.deepcopy(visual).float()  # the module's model stays as it is (its rotary buffers float32)
    with torch.inference_mode():
        plain = encode(pixels)
        assert register_vision_attention(model)
        try:
            packed, again = encode(pixels), encode(pixels)
        finally:
            visual.config._attn_implementation = "sdpa"
        model.model.visual = in_float32
        try:
            exact = encode(pixels.float())
        finally:
            model.model.visual = visual
    del in_float32
    torch.cuda.empty_cache()
    assert torch.equal(packed, again)
    packed_error, plain_error = (float((side - exact).abs().mean()) for side in (packed, plain))
    assert packed_error <= 1.05 * plain_error, f"packed {packed_error:.5f} against sdpa's {plain_error:.5f}"


def test_full_size_model_answers_in_bfloat16(backend: GlmVisionBackend) -> None:
    health = asyncio.run(backend.health())
    assert "bfloat16" in health.detail
    result = asyncio.run(backend.generate(VisionRequest(square(1024), "What is written on the sign?", task="answer")))
    assert isinstance(result.answer, str)
    assert result.answer


def test_a_very_long_image_fits_the_visual_token_cap(backend: GlmVisionBackend) -> None:
    long = DecodedImage(Image.new("RGB", (400, 20000), "white"), "PNG", 400, 20000, 0, "")
    prompt = backend.engine.codec.encode(VisionRequest(long, "q", task="answer"), thinking=False)
    assert MAX_VISUAL_TOKENS - 200 < prompt.image_tokens <= MAX_VISUAL_TOKENS
    assert asyncio.run(backend.generate(VisionRequest(long, "q", task="answer"))).answer


def test_the_compiled_batching_engine_runs_its_layers_compiled_and_agrees(engine: GlmEngine) -> None:
    """The engine as a GPU service runs it (compiled layers and encoder, CUDA graphs of decode steps and, turned on,
    of padded prefills, its own thread) over the full-size model: its first tokens for the warm-up image (a prefill's
    graph) agree with plain `generate`'s (or part at a near-tie), and requests on images of two sizes and a follow-up
    on one of them run without dynamo reaching its recompile limit, past which a layer runs uncompiled
    (`batch_engine.compiling`)."""
    watch_recompile_limit()
    before = recompile_limit_hits()
    model: Any = engine.model
    try:
        settings = EngineSettings(slots=4, max_tokens=4096, compile=True, prefill_graphs=True)
        engine.batch = started(model, settings, REFUSALS, model_name="random GLM-4.6V-Flash", fails=VisionUnavailable)
        graphs = engine.batch.device.graphs
        assert graphs, "decode steps captured as CUDA graphs"
        padded = {key[1] for key in graphs if key[0] == "prefill"}
        assert padded == set(engine.batch.device.padded_lengths()), "a prefill graph for every length bucket"
        agrees_or_parts_at_a_near_tie(engine)
        images = [square(side, sha256=f"square-{side}") for side in (1024, 640)]  # keyed: reusable
        asked = [VisionRequest(image, "What is written on the sign?", task="answer") for image in images]
        asked.append(VisionRequest(images[0], "What colour is it?", task="answer"))
        for request in asked:
            _, _, future = engine.submit(request, thinking=False, max_new_tokens=16)
            assert future.result(timeout=600).ids
        assert engine.batch.stats().prefix_hits >= 1, "the follow-up reused its image's prefix"
        assert engine.batch.stats().recompile_limit_hits == recompile_limit_hits()
    finally:
        engine.close()
        engine.batch = None
        for layer in [*model.model.language_model.layers, *model.model.visual.blocks, model.model.visual.embeddings]:
            layer._compiled_call_impl = None  # the module's other tests run the model uncompiled
        model.model.visual.__dict__.pop("forward", None)  # `compile_model`'s `trace_with_constant_ints`
        model.model.visual.config._attn_implementation = "sdpa"
        torch._dynamo.reset()  # its compiled versions would count against the next compilation's recompile limit
        torch.cuda.empty_cache()
    assert recompile_limit_hits() == before, "dynamo reached its recompile limit: some layer ran uncompiled"


def test_a_prefill_launches_the_encoder_and_places_its_output_without_waiting_on_the_device(engine: GlmEngine) -> None:
    """The image's part of a prefill only queues work: nothing reads back from the device (PyTorch's sync debug mode
    raises at any call that would wait; it does not see a staged copy from pageable memory, which `prefill` makes
    before the encoder), so the text model's launches queue behind the encoder's."""
    model: Any = engine.model
    batch = BatchEngine(model, EngineSettings(slots=1, max_tokens=4096, compile=False, prefill_graphs=False))
    steps = batch.device
    asked = VisionRequest(square(1024), "What is written on the sign?", task="answer")
    prompt = batch.prepare(engine.codec.encode(asked, thinking=False).inputs, None)
    try:
        with torch.inference_mode():
            embeds = steps.text.embed_tokens(prompt.ids.to("cuda"))
            place_images(embeds.clone(), prompt, model, steps.encoder)  # this thread's first: cuDNN builds its plans
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                place_images(embeds, prompt, model, steps.encoder)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
    finally:
        batch.close()
        model.model.visual.config._attn_implementation = "sdpa"


def noise(side: int, seed: int) -> DecodedImage:
    """Random pixels, a new image for each `seed`; `side` square."""
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand((side, side, 3), generator=generator) * 255).to(torch.uint8).numpy()
    return DecodedImage(Image.fromarray(pixels), "PNG", side, side, 0, "")


def test_the_encoder_replayed_as_a_cuda_graph_encodes_to_the_bit_as_run_eagerly(engine: GlmEngine) -> None:
    """Images of one grid through the engine's encoder graphs (`batch_engine.encoder_graphs`): the grid captured at its
    second meeting; each replay's output the same to the bit as the encoder run eagerly on that image, and kept past
    the next replay, with small tensors of other values made between replays (memory a graph reads and nothing held
    would be handed to them); a replay waits on nothing (PyTorch's sync debug mode)."""
    model: Any = engine.model
    batch = BatchEngine(model, EngineSettings(slots=1, max_tokens=4096, compile=False, prefill_graphs=True))
    graphs = batch.device.encoder_graphs
    assert graphs is not None, "the prefills replay as graphs: so does the encoder"
    asked = [VisionRequest(noise(1024, seed), "What is written on the sign?", task="answer") for seed in range(4)]
    prompts = [batch.prepare(engine.codec.encode(request, thinking=False).inputs, None) for request in asked]
    try:
        with torch.inference_mode():
            eager = [encode_images(prompt, model, None) for prompt in prompts]
            assert graphs.encode(prompts[0].pixel_values, prompts[0].grid.cpu()) is None, "a first meeting is eager"
            replayed, scribbled = [], []
            for prompt in prompts[1:]:
                replayed.append(encode_images(prompt, model, None, graphs))
                sizes = (2, 3, 16, 128, 1024, 4096, 16384, 3 * 5476)
                scribbled += [torch.full((size,), 7, dtype=torch.long, device="cuda") for size in sizes]
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                again = encode_images(prompts[1], model, None, graphs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
        assert graphs.replays == 4
        assert list(graphs.captured) == [tuple(prompts[0].grid.flatten().tolist())]
        for got, expected in zip([*replayed, again], [*eager[1:], eager[1]], strict=True):
            off = float((got.float() - expected.float()).abs().max())
            assert torch.equal(got, expected), f"replayed {off} off at most"
    finally:
        batch.close()
        model.model.visual.config._attn_implementation = "sdpa"


def agrees_or_parts_at_a_near_tie(engine: GlmEngine, tokens: int = 8) -> None:
    """The batching engine's first `tokens` tokens for the warm-up image against plain `generate`'s (eager, as
    `check_batching` runs it): equal, or parting at a near-tie (`batch_engine.start.Parting`: the engine's token at
    most four bfloat16 steps below plain's best score there). Random weights put many scores a rounding apart, and the
    two paths' kernels round differently (in float32 they agree: `bench/gpu_vision.py --check-float32`); a wider gap
    is a bug."""
    prompt = engine.codec.encode(warm_up_request(), thinking=False)
    with torch.compiler.set_stance("force_eager"):
        plain = engine.generate_ids(prompt, tokens)
    assert engine.batch is not None
    ids = engine.batch.submit(prompt.inputs, image_key=None, max_new_tokens=tokens).result(timeout=600).ids
    if ids == plain:
        return
    where = parting(engine.model, prompt.inputs, plain, ids)
    assert where is not None, f"the engine's tokens {ids} against plain generate's {plain}: no parting reproduced"
    assert where.near_tie, f"the engine's tokens {ids} against plain generate's {plain}: {where}"


@pytest.fixture(scope="module")
def real_model() -> str:
    path = os.environ.get("GLM_VISION_MODEL")
    if not path:
        pytest.skip("set GLM_VISION_MODEL to a local GLM-4.6V-Flash checkpoint directory")
    return path


def test_real_weights_read_the_receipt(real_model: str) -> None:
    asyncio.run(_read_the_receipt(real_model))


async def _read_the_receipt(real_model: str) -> None:
    backend = await GlmVisionBackend.load(real_model, device="cuda", max_new_tokens=1024)
    try:
        receipt = decode_image(RECEIPT.read_bytes(), ImageLimits())
        described = await backend.generate(VisionRequest(receipt, "What is the total?", task="describe"))
        assert any("54.06" in line.text for line in described.structured.text_lines)
        answered = await backend.generate(VisionRequest(receipt, "What is the total?", task="answer"))
        assert answered.answer is not None
        assert "54.06" in answered.answer
    finally:
        await backend.aclose()
