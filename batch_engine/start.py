"""What a backend runs to bring the batching engine up at its load: `started` (the engine over a model, a failure to
start said as what to lower) and `agrees` (its first tokens against plain `generate`'s, and where they part, whether
at a near-tie: `Parting`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
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


NEAR_TIE_STEPS = 4
"""How many relative steps (`Parting.step`) at the scores' magnitude the engine's token may trail plain `generate`'s
best and still be a near-tie (`Parting.near_tie`)."""

FLOOR_STEP = 2.0**-16
"""The smallest relative step a near-tie is judged in: float32's own (2⁻²³) is below what summing in another order
moves a score by, which the engine's kernels do."""


@dataclass(frozen=True)
class Parting:
    """Where the engine's greedy tokens first differ from plain `generate`'s, and plain's scores there (after its
    logits processors, as it chose): its best, the engine's token's, and how many tokens it scored above that one."""

    at: int
    best: float
    chosen: float
    rank: int
    step: float
    """The relative step of the model's dtype (`torch.finfo(dtype).eps`: 2⁻⁷ for bfloat16), at least `FLOOR_STEP`."""

    @property
    def near_tie(self) -> bool:
        """Whether the engine's token trails plain's best by at most `NEAR_TIE_STEPS` steps at the magnitude of the
        larger of the two scores: the two paths' kernels round differently, so either may pick a token a rounding
        apart; a wider gap means the engine computes something else than plain `generate`. Scores that are not
        finite are never a near-tie."""
        if not (math.isfinite(self.best) and math.isfinite(self.chosen)):
            return False
        magnitude = 2.0 ** math.floor(math.log2(max(abs(self.best), abs(self.chosen), 2.0**-126)))
        return self.best - self.chosen <= NEAR_TIE_STEPS * self.step * magnitude

    def __str__(self) -> str:
        verdict = (
            "a near-tie, which the two attention paths may round either way"
            if self.near_tie
            else "not a near-tie: the engine computes something else than plain generate"
        )
        return (
            f"they part at token {self.at}, where plain generate's best score is {self.best:.4f} and the engine's "
            f"token's {self.chosen:.4f} (rank {self.rank}): {verdict}"
        )


def parted_at(expected: list[int], got: list[int]) -> int | None:
    """The first place where `got` differs from `expected`; None where they agree as far as both go."""
    return next((n for n, (want, have) in enumerate(zip(expected, got, strict=False)) if want != have), None)


def parting(model: Any, inputs: Mapping[str, Any], expected: list[int], got: list[int]) -> Parting | None:
    """Where `got` (the engine's tokens) first differs from `expected` (plain `generate`'s for `inputs`), with plain's
    scores there from one more plain `generate` run eagerly up to that token; None where they do not differ within
    both (one stopped sooner), or where that run does not reproduce `expected` up to there (another config)."""
    import torch

    at = parted_at(expected, got)
    if at is None:
        return None
    from stage_protocol.generation import generation_config

    config = generation_config(model.generation_config, at + 1)
    config.output_scores = config.return_dict_in_generate = True
    on_device = {name: value.to(model.device) if hasattr(value, "to") else value for name, value in inputs.items()}
    # eager, as the backends' checks run plain `generate` (the stance is the process's: the engine idles meanwhile)
    with torch.inference_mode(), torch.compiler.set_stance("force_eager"):
        output = model.generate(**on_device, generation_config=config)
    prompt = on_device["input_ids"].shape[1]
    if output.sequences[0, prompt:].tolist()[: at + 1] != expected[: at + 1]:
        return None
    scores = output.scores[at][0].float()
    chosen = scores[got[at]]
    step = max(float(torch.finfo(model.dtype).eps), FLOOR_STEP)
    return Parting(at, float(scores.max()), float(chosen), int((scores > chosen).sum()), step)


def agrees(engine: BatchEngine, inputs: Mapping[str, Any], expected: list[int], *, what: str) -> bool:
    """Whether `engine`'s greedy tokens for `inputs` equal `expected` (plain `generate`'s for them), blocking. A
    difference is logged (naming `what` was asked) with where they part and whether at a near-tie (`parting`), not
    raised: the two attention paths round differently and may part at a near-tie; a wider gap would be a bug."""
    got = engine.submit(inputs, image_key=None, max_new_tokens=len(expected)).result(timeout=600).ids
    if got != expected:
        try:
            where = parting(engine.model, inputs, expected, got)
        except Exception:  # a diagnosis that fails must not fail the load
            log.exception("batching engine: reading plain generate's scores where the engine parts from it failed")
            where = None
        log.warning(
            "batching engine: its first tokens %s differ from plain generate's %s on %s (%s)%s",
            got, expected, what, getattr(engine.model, "dtype", "?"), f": {where}" if where else "",
        )  # fmt: skip
    return got == expected
