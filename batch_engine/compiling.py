"""What the batching engine compiles (`EngineSettings.compile`), and why each part is compiled the way it is: the text
model's decoder layers, and an image model's vision encoder blocks and position embeddings; and the prefills its
start runs so that no request's prefill compiles (`warm_prefills`)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from batch_engine.settings import COMPILE_SHAPES

if TYPE_CHECKING:
    from batch_engine.prompts import Prompt
    from batch_engine.steps import DeviceSteps

WARM_LENGTHS = (16, 24)
"""The prompt lengths `warm_prefills` prefills (the second under automatic dynamic shapes only, so that the length
becomes symbolic)."""
WARM_PREFIX = 32
"""The reused prefix of `warm_prefills`' prefill after one (twice as long at its second length)."""
WARM_SPAN = 300
"""The riding rows' length `warm_prefills` tells its second prefill with rows riding: in the second span bucket (512
positions), so that the span changes."""
WARM_REUSED = 144
"""The new tokens of `warm_prefills`' prefill after a reused prefix: more than an extend step takes (128)."""


DYNAMO_SETTINGS: dict[str, Any] = {
    # One compilation for all layers: their index is an input, not a constant to specialise on. So are the other
    # ints on the modules (head size and count), which leaves the compiled code's index arithmetic symbolic;
    # `bench/gpu_parts.py` measures what that costs a prefill.
    "allow_unspec_int_on_nn_module": True,
    # Prefill, follow-up extend and decode steps each compile their own versions of a layer's pieces (about eight of
    # the attention's part), and the vision encoder's blocks count against the same limit (transformers wraps every
    # layer's `forward` in one function, whose code object dynamo keeps one cache for); past dynamo's limit (8 by
    # default) a new version would run uncompiled, with one warning in the log.
    "recompile_limit": 64,
}
"""The dynamo settings the compiled layers are compiled under (`use_dynamo_settings`)."""


ENCODER_DYNAMO_SETTINGS: dict[str, Any] = {
    # The vision encoder's blocks have no index to share one compilation by, and with their head count symbolic
    # (`DYNAMO_SETTINGS`) each block's fused rotary and layout kernel divided by it at every element: 108 µs a block
    # on an H100 for a 1024×1024 image; 25 µs with it constant on another, where the encoder took 25.0 ms against
    # 26.5 (`bench/gpu_parts.py --profile`, `bench/RESULTS.md`).
    "allow_unspec_int_on_nn_module": False,
}
"""The dynamo settings the vision encoder runs under (`encoder_settings`): its modules' ints constants."""


def encoder_settings() -> Any:
    """A context in which the vision encoder is traced and run (`trace_with_constant_ints`): `ENCODER_DYNAMO_SETTINGS`
    over the thread's own (settings are the thread's own in the torch the project pins). Its blocks compile with
    dynamic shapes (`compile_model`), so one compilation serves every image size; of its ints, only those that vary
    with the image (patches, bounds) are symbolic then."""
    import torch

    return torch._dynamo.config.patch(ENCODER_DYNAMO_SETTINGS)


def use_dynamo_settings() -> None:
    """Set `DYNAMO_SETTINGS` for the calling thread. Recent torch (the 2.14 the project pins among them) keeps the
    dynamo settings a program sets per thread, per context strictly (`torch/utils/_config_module.py`: "User
    overrides are thread-local"; `asyncio.to_thread` hands its worker a copy of the caller's context). So whatever
    runs the compiled layers sets them first: `compile_model`, whose caller also runs plain `generate` as the
    engine's reference; the engine's own thread, which runs the prefills and the decode steps (`BatchEngine.start`);
    and the `local` backend's plain `generate` for a sampled request, beside the engine. Without them the layers
    compile apart (each index a constant), and those past the recompile limit run uncompiled."""
    import torch

    for name, value in DYNAMO_SETTINGS.items():
        if name == "recompile_limit":
            value = max(torch._dynamo.config.recompile_limit, value)
        setattr(torch._dynamo.config, name, value)


class _RecompileLimitHits(logging.Handler):
    """Counts dynamo's "hit config.recompile_limit" warnings, from any thread (`recompile_limit_hits`)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("torch._dynamo hit config"):
            self.count += 1


_HITS = _RecompileLimitHits()


def watch_recompile_limit() -> None:
    """Count, from now on, the times dynamo reaches its recompile limit in this process (`recompile_limit_hits`).
    Idempotent; `compile_model` calls it."""
    dynamo = logging.getLogger("torch._dynamo")
    if _HITS not in dynamo.handlers:
        dynamo.addHandler(_HITS)


def recompile_limit_hits() -> int:
    """How many times dynamo has reached its recompile limit in this process since `watch_recompile_limit`: each
    time, a compiled function (a layer, an encoder block, of any engine here) runs uncompiled from then on for the
    new sizes or kinds of call. Past 0 the engine is slower than it should be; the log names the function."""
    return _HITS.count


def compile_model(model: Any, decoder: Any, shapes: str = COMPILE_SHAPES[0], *, dependent_launch: bool = False) -> None:
    """`torch.compile` the decoder's layers and, in an image model, the vision encoder's blocks and position
    embeddings; each compiled on its first call. `shapes`: the decoder layers' `EngineSettings.compile_shapes`;
    `dependent_launch`: the layers' kernels launched so (`EngineSettings.dependent_launch`, inductor's
    `triton.enable_pdl`, where this torch has it)."""
    import torch._inductor.config

    use_dynamo_settings()
    watch_recompile_limit()
    # `automatic` (the default) leaves the sizes that never change (the model's own) constants: on the CPU the
    # generated code of a GLM-4 prefill and decode held 18 divisions by a symbolic size instead of 95, in 13 graphs
    # instead of 8 (the same 13 for 12 layers as for 24: the layer index stays one symbolic input); on an H200 a
    # GLM-4.6V-Flash prefill of 1,397 tokens took 38.9 ms of the layers' time instead of 41.9 (`bench/RESULTS.md`).
    pdl = dependent_launch and hasattr(torch._inductor.config.triton, "enable_pdl")
    options = {"triton.enable_pdl": True} if pdl else None
    for layer in decoder.layers:
        layer.compile(dynamic=True if shapes == "dynamic" else None, options=options)
    # The vision encoder's blocks: their norms, rotary and activations fused took GLM-4.6V-Flash's encoder from 45 to
    # 39 ms for a 1024×1024 image on an H200 (`bench/gpu_parts.py`), when each block still broke where transformers'
    # `sdpa` path splits the patches per image; with the packed attention (`batch_engine.vision_attention`) each
    # compiles whole (32.8 → 28.8 ms in a probe on an H100, `bench/RESULTS.md`). Dynamic shapes serve every image
    # size with one compilation; compiled for one size the encoder was 1.5 ms faster still, but every new size would
    # then compile again, seconds each, at request time. Traced under `encoder_settings` (`trace_with_constant_ints`),
    # the model's own ints (heads, head size) stay constants.
    visual = getattr(model.model, "visual", None)
    for block in getattr(visual, "blocks", ()):
        block.compile(dynamic=True)
    # Its position embeddings, interpolated (bicubic) to each image's grid: eagerly one `grid_sample` kernel, 2.6 ms
    # of the encoder's 27 in that probe's profile; compiled, arithmetic that inductor spreads over every value (not
    # yet timed on a GPU).
    if (embeddings := getattr(visual, "embeddings", None)) is not None:
        embeddings.compile(dynamic=True)
    if visual is not None:
        trace_with_constant_ints(visual)


def trace_with_constant_ints(visual: Any) -> None:
    """Have the vision encoder `visual` run under `encoder_settings` whoever calls it. Dynamo keeps no guard on the
    setting: compiled code traced without it would serve on, its head count symbolic, so it is made part of the
    encoder rather than of each caller. Idempotent (it wraps the class's own `forward`)."""
    forward = type(visual).forward.__get__(visual)

    @functools.wraps(forward)
    def under_encoder_settings(*args: Any, **kwargs: Any) -> Any:
        with encoder_settings():
            return forward(*args, **kwargs)

    visual.forward = under_encoder_settings


def warm_prefills(prepare: Callable[[Mapping[str, Any], str | None], Prompt], device: DeviceSteps) -> None:
    """Prefill, at start and before any request, the kinds of prefill a request may meet, so that none compiles at
    request time (seconds on a GPU): a prompt from its start, alone and with rows riding along (`DeviceSteps.rides`),
    and one after a reused prefix too long for an extend step (`WARM_REUSED` tokens after `WARM_PREFIX`; the decode
    and extend steps compile as their CUDA graphs are captured). Under `compile_shapes` `automatic` each kind twice,
    at two lengths, so that the lengths become symbolic. Each into the first slots, freed after; nothing is kept for
    reuse. An image prompt's encoder compiles at its first image (the `glm` backend's start checks the engine on
    one)."""
    import torch

    from batch_engine.stores import StoredKV

    # Prepared as a request's prompt is, outside inference mode (on the caller's thread): the compiled code is
    # specialised on how its input tensors were made too.
    kinds = 2 if device.settings.compile_shapes == "automatic" else 1
    fresh = [_warm_prompt(prepare, length) for length in WARM_LENGTHS[:kinds]]
    reused = [
        (_warm_prompt(prepare, prefix + WARM_REUSED + extra), prefix)
        for prefix, extra in ((WARM_PREFIX, 0), (2 * WARM_PREFIX, 8))[:kinds]
    ]
    cache = device.cache
    with torch.inference_mode():
        for prompt in fresh:
            device.prefill(prompt, 0, None)
            device.release(0)
        if device.settings.ride_along:
            for riders, prompt, longest in _riding(device, fresh):
                for row in range(riders):
                    device.prefill(fresh[0], row, None)
                device.prefill(prompt, riders, None, longest)
                for row in range(riders + 1):
                    device.release(row)
        for prompt, prefix in reused:
            stored = StoredKV(cache.keys[:, 0, :, :prefix].clone(), cache.values[:, 0, :, :prefix].clone())
            device.prefill(prompt, 0, stored)
            device.release(0)


def _riding(device: DeviceSteps, fresh: list[Prompt]) -> list[tuple[int, Prompt, int]]:
    """The prefills with rows riding along that `warm_prefills` runs: (rows riding, the prompt, the longest row's
    length as the step is told it). Dynamo compiles a size of 1 apart from the others, so one row riding and two are
    each a kind, and each is run at two spans (and, under automatic dynamic shapes, two prompt lengths), so that
    those become symbolic in both (with one span for one row, a request's ride with one row along a longer span
    compiled at request time on an H100)."""
    most = device.settings.slots - 1
    kinds = [(1, fresh[0], fresh[0].tokens), (2, fresh[-1], WARM_SPAN), (1, fresh[-1], WARM_SPAN)]
    return [(min(riders, most), prompt, longest) for riders, prompt, longest in kinds if most]


def _warm_prompt(prepare: Callable[[Mapping[str, Any], str | None], Prompt], length: int) -> Prompt:
    """A text prompt of `length` tokens (all 0), whose prefixes are not kept."""
    import dataclasses

    import torch

    ids = torch.zeros((1, length), dtype=torch.long)
    prompt = prepare({"input_ids": ids, "mm_token_type_ids": torch.zeros_like(ids)}, None)
    return dataclasses.replace(prompt, prefixes=())
