"""cuDNN's attention plans: one per power of two of the lengths instead of one per length, built before requests.

PyTorch's cuDNN attention builds a plan (a cuDNN graph, its execution plans) the first time its calling thread meets a
set of sizes and strides, and keeps it for that thread: about 36–64 ms on H100s at each new prompt length and each
new image grid (`bench/gpu_sdpa_shapes.py`), paid by the first request that brings it, once per process. PyTorch's
opt-in `TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1` plans per power of two of the lengths instead, passing each call's own
lengths at run time, for calls without a mask whose queries, keys, values and output are laid out positions outer,
heads inner (`positions_outer`); PyTorch reads the variable once, at the process's first cuDNN attention.

With `EngineSettings.attention_plans` `power-of-two` (the default) the `glm` and `local` backends and the GPU
benchmarks set it (`plan_by_power_of_two`) before anything runs on the model; an engine whose process has it set then
lays out the tensors of a prefill from position 0 (causal, no mask) and of the vision encoder's attention over one
image so (`positions_outer`), and its thread plans every power of two a request may meet (`warm_plans`) before it
serves. A prefill after a reused prefix (a follow-up too long for an extend step) is masked and keeps a plan per
length.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger("batch_engine")

VARIABLE = "TORCH_CUDNN_SDPA_AVOID_RECOMPILE"
"""PyTorch's environment variable for cuDNN attention plans per power of two of the lengths (`1`: on)."""


def plan_by_power_of_two() -> bool:
    """Ask PyTorch for plans per power of two, unless the environment already says either way; whether it asks.
    Effective only before the process's first cuDNN attention."""
    os.environ.setdefault(VARIABLE, "1")
    return by_power_of_two()


def by_power_of_two() -> bool:
    """Whether the environment asks PyTorch for cuDNN attention plans per power of two of the lengths."""
    return os.environ.get(VARIABLE) == "1"


def planned_on(device: torch.device) -> bool:
    """Whether attention on `device` takes the plans per power of two: a CUDA device, with the variable set. Only
    there are tensors laid out for them (`positions_outer`) and plans built (`warm_plans`)."""
    return device.type == "cuda" and by_power_of_two()


def positions_outer(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, (batch, heads, positions, dim), as it is where it is laid out positions outer and heads inner (the
    vision encoder's rotated queries and keys), else a copy so laid out (the slots' K and V, a decoder layer's rotated
    queries, the encoder's values, a view of its packed projection). PyTorch's own check: the plans per power of two
    ignore a batch's stride."""
    if tensor.transpose(1, 2).is_contiguous():
        return tensor
    batch, heads, positions, dim = tensor.shape
    return tensor.new_empty((batch, positions, heads, dim)).transpose(1, 2).copy_(tensor)


def powers_of_two(most: int, *, least: int = 2) -> list[int]:
    """The powers of two from `least` up to the first at or above `most`: the lengths PyTorch plans for."""
    lengths = [least]
    while lengths[-1] < most:
        lengths.append(lengths[-1] * 2)
    return lengths


def warm_plans(model: Any, max_tokens: int, *, vision: bool) -> int | None:
    """Build, on the calling thread (cuDNN's plans are the thread's own), the plans of every prefill from position 0
    of up to `max_tokens` tokens, and with `vision` of the encoder's attention over every image of up to that many
    image tokens; the number of calls made. Each call as the engine makes it: batch 1, the model's heads and dtype,
    laid out positions outer. None where there is nothing to plan: not on a CUDA device, not in half precision, or
    plans per length."""
    import torch

    if not planned_on(model.device) or model.dtype not in (torch.float16, torch.bfloat16):
        return None  # cuDNN's attention takes half precision only
    attend = torch.nn.functional.scaled_dot_product_attention
    text = model.config.get_text_config()
    dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    shapes = [
        (length, text.num_attention_heads, text.num_key_value_heads, dim, True) for length in powers_of_two(max_tokens)
    ]
    if vision:
        encoder = model.config.vision_config
        patches = max_tokens * encoder.spatial_merge_size**2
        heads = encoder.num_heads
        shapes += [(length, heads, heads, encoder.hidden_size // heads, False) for length in powers_of_two(patches)]
    with torch.inference_mode():
        for length, heads, kv_heads, dim, causal in shapes:
            query = _laid_out(model, length, heads, dim)
            key, value = _laid_out(model, length, kv_heads, dim), _laid_out(model, length, kv_heads, dim)
            attend(query, key, value, is_causal=causal, enable_gqa=heads != kv_heads)
    return len(shapes)


def build_plans(model: Any, max_tokens: int, *, vision: bool) -> None:
    """`warm_plans` as the engine's thread runs it before it serves: logged, and a failure logged, not raised (a
    request then builds its plan, as with plans per length)."""
    started = time.perf_counter()
    try:
        planned = warm_plans(model, max_tokens, vision=vision)
    except Exception:
        log.exception("batching engine: building the attention plans failed")
        return
    if planned is not None:
        log.info("batching engine: %d attention plans built in %.1f s", planned, time.perf_counter() - started)


def _laid_out(model: Any, length: int, heads: int, dim: int) -> torch.Tensor:
    import torch

    return torch.zeros((1, length, heads, dim), device=model.device, dtype=model.dtype).transpose(1, 2)
