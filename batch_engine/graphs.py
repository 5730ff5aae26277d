"""The batching engine's CUDA graphs (`batch_engine.steps`): one decode step per (batch, span) bucket, one
follow-up extend step per (new tokens, span) bucket and, where prefills are padded, one prefill from position 0 per
length bucket, captured at start into one memory pool and replayed by the steps in place of their kernels' launches
(and of the host's work between them: a prefill's forty layers took an H100's host about as long as its device)."""

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

    from batch_engine.steps import BATCH_BUCKETS, EXTEND_BUCKETS, SPAN_BUCKETS

    if steps.device.type != "cuda" or not steps.settings.cuda_graphs:
        return
    batches = sorted({min(size, steps.settings.slots) for size in BATCH_BUCKETS})
    spans = sorted({min(size, steps.capacity) for size in SPAN_BUCKETS})
    pool = torch.cuda.graph_pool_handle()
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
                steps.graphs[key] = _capture_one(step, pool)
            except Exception:
                log.exception("batching engine: graph %s not captured; it runs eagerly", key)
    steps.reset()
    log.info("batching engine: %d graphs captured in %.1f s", len(steps.graphs), time.perf_counter() - started)


def _capture_one(step: Callable[[], None], pool: Any) -> Any:
    import torch

    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up, outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        step()
    torch.cuda.synchronize()
    return graph
