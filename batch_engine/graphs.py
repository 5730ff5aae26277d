"""The batching engine's CUDA graphs (`batch_engine.steps`) and the sizes its steps are bucketed to: one decode step
per (batch, span) bucket, one follow-up extend step per (new tokens, span) bucket and, where prefills are padded
(`padded_length`), one prefill from position 0 per length bucket, captured at start into one memory pool and replayed
by the steps in place of their kernels' launches and of the host's work between them (on an H100 a lone prefill's
forty text layers were seen to wait on that work, `bench/RESULTS.md`)."""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batch_engine.steps import DeviceSteps

log = logging.getLogger("batch_engine")


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
SPAN_BUCKETS = tuple(2**n for n in range(8, 18))  # 256 … 131,072 positions
EXTEND_BUCKETS = (16, 32, 64, 128)
"""New-token counts of a follow-up's prefill (after a reused prefix), each a CUDA graph like a decode step."""


def padded_length(tokens: int) -> int:
    """The length bucket a prefill of `tokens` from position 0 is padded to (`EngineSettings.prefill_graphs`): the
    next multiple of 128 up to 2,048 tokens, of 256 up to 4,096, and so on (at most an eighth more tokens past 1,024),
    so that a slot of 8,192 positions has 32 of them."""
    step = max(128, 1 << max(0, (tokens - 1).bit_length() - 4))
    return -(-tokens // step) * step


def capture(
    steps: DeviceSteps,
    decode: Callable[[int, int], None],
    extend: Callable[[int, int], None],
    prefill: Callable[[int], None],
) -> None:
    """Capture `steps`' `decode` (batch, span), `extend` (new tokens, span) and, where `steps.padded`, `prefill`
    (length bucket) steps as graphs into `steps.graphs` (CUDA devices with `cuda_graphs` only; before any request).
    A capture that fails leaves that bucket eager and says so in the log."""
    import torch

    if steps.device.type != "cuda" or not steps.settings.cuda_graphs:
        return
    batches = sorted({min(size, steps.settings.slots) for size in BATCH_BUCKETS})
    spans = sorted({min(size, steps.capacity) for size in SPAN_BUCKETS})
    pool = new_pool()
    started = time.perf_counter()
    with torch.inference_mode():
        kinds: list[tuple[tuple[Any, ...], Callable[[], None]]] = [
            ((bucket, span), functools.partial(decode, bucket, span))
            for bucket, span in itertools.product(batches, spans)
        ]
        kinds += [
            (("extend", count, span), functools.partial(extend, count, span))
            for count, span in itertools.product(EXTEND_BUCKETS, spans)
            if count < span
        ]
        if steps.padded:  # the longest first: the shorter ones can reuse its memory
            kinds += [(("prefill", count), functools.partial(prefill, count)) for count in steps.padded_lengths()[::-1]]
        for key, step in kinds:
            try:
                steps.graphs[key] = capture_one(step, pool)
            except Exception:
                log.exception("batching engine: graph %s not captured; it runs eagerly", key)
    steps.reset()
    log.info("batching engine: %d graphs captured in %.1f s", len(steps.graphs), time.perf_counter() - started)


def new_pool() -> Any:
    """A memory pool for CUDA graphs to share (`capture_one`)."""
    import torch

    return torch.cuda.graph_pool_handle()


def capture_one(step: Callable[[], None], pool: Any, *, error_mode: str = "global") -> Any:
    """`step` captured as a CUDA graph into `pool`, after one run outside it on a side stream (where a compiled part
    meets its sizes and cuDNN plans its attention); the device synchronised after. `error_mode`: PyTorch's
    `capture_error_mode` (`thread_local`: only the capturing thread's calls are checked for what a capture forbids,
    where other threads may be using the device)."""
    import torch

    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up, outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode=error_mode):
        step()
    torch.cuda.synchronize()
    return graph
