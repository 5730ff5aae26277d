"""Python's cyclic garbage collector in a server that has loaded its models: `frozen_heap`.

A collection of the oldest generation walks every object the collector tracks, with the interpreter lock held: every
request's thread, the event loop and a batching engine's thread wait for it. A loaded service holds hundreds of
thousands of such objects that live as long as it does (the models' modules and parameters, transformers' and torch's
imports, compiled graphs): the service on its embedded models tracks about 565,000, and one such collection took
333–378 ms on the CPU it was measured on; the GLM engine's process on a GPU about 700,000–950,000, 446–633 ms
(`bench/gc_pauses.py`, `bench/gpu_vision.py`; docs/benchmarks.md). `gc.freeze` moves them to a permanent generation
that collections skip, as vLLM does once its engine is up and SGLang after its warm-up.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


def freeze() -> int:
    """Collect the garbage, then freeze what is left (`frozen_heap`); how many objects that is."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@contextmanager
def frozen_heap() -> Iterator[int]:
    """What the process holds now, its garbage collected first, kept out of the collector's walks while the block
    runs (it yields how many objects that is); given back to it after. Enter it once the models are loaded, around
    serving. An object frozen so is still freed by reference counting; one that becomes garbage inside a reference
    cycle stays until the block ends, so what is frozen should be what lives as long as the server. Frozen twice
    (two apps in one process), the first to end gives every object back."""
    frozen = freeze()
    log.info("%d objects kept out of the garbage collector's walks while serving", frozen)
    try:
        yield frozen
    finally:
        gc.unfreeze()
