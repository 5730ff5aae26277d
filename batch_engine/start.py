"""What a backend runs to bring the batching engine up at its load: `started` (the engine over a model, a failure to
start said as what to lower) and `agrees` (its first tokens against plain `generate`'s)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from batch_engine.engine import BatchEngine
from batch_engine.settings import EngineSettings
from batch_engine.types import Refusals

log = logging.getLogger("batch_engine")


def started(
    model: Any, settings: EngineSettings, refusals: Refusals, *, model_name: str, fails: type[Exception]
) -> BatchEngine:
    """The engine over `model`, started (blocking: on a GPU it compiles and captures its CUDA graphs). Any failure is
    `fails` saying what to lower, naming `model_name`: the KV cache of every slot is allocated here."""
    try:
        engine = BatchEngine(model, settings, refusals)
        engine.start()
    except Exception as exc:
        raise fails(
            f"could not start the batching engine of {model_name} ({type(exc).__name__}: {exc}); its "
            f"{settings.slots} slots of {settings.max_tokens} tokens may not fit: lower {refusals.setting('_SLOTS')} "
            f"or {refusals.setting('_MAX_TOKENS')}, or set {refusals.setting('')}=generate"
        ) from exc
    return engine


def agrees(engine: BatchEngine, inputs: Mapping[str, Any], expected: list[int], *, what: str) -> bool:
    """Whether `engine`'s greedy tokens for `inputs` equal `expected` (plain `generate`'s for them), blocking. A
    difference is logged (naming `what` was asked), not raised: in bfloat16 the two attention paths round
    differently and may part at a near-tie; in float32 it would be a bug."""
    got = engine.submit(inputs, image_key=None, max_new_tokens=len(expected)).result(timeout=600).ids
    if got != expected:
        log.warning(
            "batching engine: its first tokens %s differ from plain generate's %s on %s (%s)",
            got, expected, what, getattr(engine.model, "dtype", "?"),
        )  # fmt: skip
    return got == expected
