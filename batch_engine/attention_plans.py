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

A plan per power of two costs every call more than a plan per length (`bench/gpu_sdpa_shapes.py`), and the copies
into that layout cost too. So with `EngineSettings.recurring_plans` (on by default) an attention call that recurs
gets a plan of its own: the engine's thread counts each call's sizes and strides (`RecurringCalls`); one met in two
prefills has its plan per length built once the engine has idled for `IDLE_S`, one at a time, and from then on goes
to cuDNN as it is, with no copy, taking that plan.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from cachetools import LRUCache

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
    if _laid_out_so(tensor):
        return tensor
    batch, heads, positions, dim = tensor.shape
    return tensor.new_empty((batch, positions, heads, dim)).transpose(1, 2).copy_(tensor)


def _laid_out_so(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is laid out positions outer, heads inner, as PyTorch checks it (`use_ragged_in_dense`)."""
    return tensor.transpose(1, 2).is_contiguous()


def _all_laid_out(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return positions_outer(query), positions_outer(key), positions_outer(value)


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


IDLE_S = 0.25
"""How long the engine's thread has had nothing to do before it builds a recurring call's plan (36–64 ms on H100s, a
request that comes meanwhile waiting for it): so not between one client's back-to-back requests."""

Signature = tuple[Any, ...]
"""An attention call as cuDNN plans it: the tensors' dtype, device, sizes and strides, causal or not, the scale and
whether heads are grouped."""


class RecurringCalls:
    """The attention calls of one thread (the engine's) that recur, and the plans per length built for them: a call
    met in `after` of the engine's prefills waits for its plan, which `build_one` builds (on that thread: cuDNN's plans
    are the thread's own); `arrange` then hands its tensors on as they are, to take it. At most `most` calls are
    planned so, the rest taking the plans per power of two. `enabled` off: every call takes those
    (`EngineSettings.recurring_plans`)."""

    def __init__(self, *, after: int = 2, most: int = 64) -> None:
        self.after, self.most = after, most
        self.enabled = True
        self._turn = 0
        """The engine's prefill (`turn`): a call is counted once a prefill, however many layers make it."""
        self._seen: LRUCache[Signature, tuple[int, int]] = LRUCache(maxsize=4 * most)
        """The calls met and not planned: (prefills met in, the last of them), the least recently met forgotten
        first, so that a service's many lengths met once make way."""
        self._waiting: dict[Signature, None] = {}
        """The calls met `after` times whose plan is not built yet, oldest first."""
        self.planned: set[Signature] = set()
        """The calls whose plan per length is built."""
        self._failed: set[Signature] = set()
        """The calls whose plan failed to build: they keep the plans per power of two."""

    def turn(self, *, enabled: bool) -> None:
        """A new prefill of the engine's, with `EngineSettings.recurring_plans` as it now is."""
        self.enabled = enabled
        self._turn += 1

    def arrange(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, causal: bool, scale: float, gqa: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The call's tensors as they go to cuDNN: as they are where its plan per length is built, else laid out
        positions outer (`positions_outer`) for a plan per power of two; the call is counted."""
        if all(_laid_out_so(tensor) for tensor in (query, key, value)):
            return query, key, value  # already as the plans per power of two take it: nothing to gain
        if self.enabled:
            signature = _signature(query, key, value, causal, scale, gqa)
            if signature in self.planned:
                return query, key, value
            self._count(signature)
        return _all_laid_out(query, key, value)

    def _count(self, signature: Signature) -> None:
        """One more meeting of a call not planned, once a prefill; met in `after` prefills, it waits for its plan,
        room allowing."""
        if signature in self._waiting or signature in self._failed:
            return
        met, last = self._seen.get(signature, (0, -1))
        if last == self._turn:
            return
        self._seen[signature] = (met + 1, self._turn)
        if met + 1 >= self.after and len(self.planned) + len(self._waiting) < self.most:
            del self._seen[signature]
            self._waiting[signature] = None

    def build_one(self) -> bool:
        """Build the plan of the oldest call waiting for one, on the calling thread; whether one waited. A failure
        is logged, and that call keeps the plans per power of two."""
        if not self.enabled or not self._waiting:
            return False
        signature = next(iter(self._waiting))
        del self._waiting[signature]
        started = time.perf_counter()
        try:
            _plan(signature)
        except Exception:
            log.exception("batching engine: building an attention plan for a recurring call failed")
            self._failed.add(signature)
            return True
        self.planned.add(signature)
        log.info("batching engine: a recurring attention call's own plan built in %.1f ms",
                 (time.perf_counter() - started) * 1000)  # fmt: skip
        return True


_thread = threading.local()


def serve(calls: RecurringCalls | None) -> None:
    """Make `calls` the calling thread's (the engine's thread, before it serves), for `arranged`."""
    _thread.calls = calls


def arranged(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, causal: bool, scale: float, gqa: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An attention call's tensors as they go to cuDNN where it plans per power of two (`planned_on`): through the
    calling thread's `RecurringCalls` where it has them (`serve`), else laid out positions outer."""
    calls: RecurringCalls | None = getattr(_thread, "calls", None)
    if calls is None:
        return _all_laid_out(query, key, value)
    return calls.arrange(query, key, value, causal=causal, scale=scale, gqa=gqa)


def _signature(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool, scale: float, gqa: bool
) -> Signature:
    tensors = tuple((tuple(t.shape), t.stride()) for t in (query, key, value))
    return (query.dtype, query.device, tensors, causal, scale, gqa)


def _plan(signature: Signature) -> None:
    """One call of `signature` on zeros of its sizes and strides: cuDNN builds (and keeps) its plan."""
    import torch

    dtype, device, tensors, causal, scale, gqa = signature
    query, key, value = (
        torch.empty_strided(size, stride, dtype=dtype, device=device).zero_() for size, stride in tensors
    )
    with torch.inference_mode():
        torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=causal, scale=scale, enable_gqa=gqa
        )


def _laid_out(model: Any, length: int, heads: int, dim: int) -> torch.Tensor:
    import torch

    return torch.zeros((1, length, heads, dim), device=model.device, dtype=model.dtype).transpose(1, 2)
