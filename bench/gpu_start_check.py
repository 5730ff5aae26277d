"""A lone request's first token through the batching engine right after the `glm` backend's start check
(`GlmEngine.check_batching`: plain `generate` eagerly for 8 tokens of the warm-up image, then the engine on the same
image) against right after the engine idled `IDLE_WAIT` with nothing else run, in one process.

    python bench/gpu_start_check.py [--rounds 8] [--image-side 1024]    # on the GPU machine
    python bench/gpu_start_check.py --tiny                              # the same code on a CPU

A service runs that check once, after the engine starts and before its first request: this measures whether the
requests after it are slower. The engine builds a recurring attention call's own plan only once it has idled `IDLE_S`
(`batch_engine.attention_plans`), and the check leaves it idle about that long while plain `generate` runs (8 tokens
at plain's 40–42 ms a token on H100s, about a third of a second; not timed apart): so the baseline idles it too, and
a first `cold` turn, straight after the one untimed request, shows lone requests that come back to back before any
idle (on an H100 they were slower than the rest, bench/RESULTS.md). With the `batch_engine` log at INFO, each plan
the engine builds is logged between the turns.

GLM-4.6V-Flash's full architecture with random weights in bfloat16, the engine as `bench/gpu_vision.py --compile`
builds it (32 slots, compiled layers, cuDNN's attention planned per power of two), the heap frozen as the service
freezes it, one untimed request after the start. The turns come in the order cold, idled, checked, checked, idled (a
machine that drifts within the run weighs on both compared sides alike); an `idled` turn waits `IDLE_WAIT` first, a
`checked` turn runs the check once. Each turn is `--rounds` lone requests with no warm-up of its own (the first
request after the check is the one a service's first client meets), each on an image not seen before, timed by the
engine (`first_token_ms`: submit to first token). The table gives the two compared sides' p50 over their turns; a
note lists every turn's samples in the order taken. The first `checked` turn comes after the `cold` and `idled` ones,
not straight after the start.

`--tiny` runs a 2-layer model on the CPU: it proves the code path, measures nothing.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `bench`, `tests` and the stage packages importable
    sys.path.insert(0, str(ROOT))

from batch_engine.attention_plans import IDLE_S  # noqa: E402
from bench.gpu_alone import compare_lone, lone_turns  # noqa: E402
from bench.gpu_vision import Bench  # noqa: E402

TURNS = ("cold", "idled", "checked", "checked", "idled")

IDLE_WAIT = 4 * IDLE_S
"""Seconds an `idled` turn waits before its first request: four times the engine's `IDLE_S` (1 s), time to build
what waits (a plan takes 36–64 ms on H100s)."""


def backend_engine(bench: Bench) -> Any:
    """The `glm` backend's `GlmEngine` over the benchmark's model, processor and started batching engine."""
    from vision_stage.glm_codec import GlmCodec
    from vision_stage.glm_engine import GlmEngine

    return GlmEngine(bench.model, GlmCodec.for_model(bench.processor, bench.model), batch=bench.engine)


def run(bench: Bench, rounds: int) -> tuple[dict[str, list[float]], list[str]]:
    """Each side's samples over its turns, and the samples of each turn in the order taken: `checked` turns begin
    with `GlmEngine.check_batching`, `idled` turns with `IDLE_WAIT` of nothing, `cold` with neither."""
    backend = backend_engine(bench)

    @contextlib.contextmanager
    def side(name: str) -> Iterator[None]:
        if name == "checked":
            backend.check_batching()  # its answer (near-ties of random weights may part) is not what is measured
        elif name == "idled":
            time.sleep(IDLE_WAIT)
        yield

    bench.engine_run([bench.prompt(6999)], 1)  # the one untimed request after the start
    return lone_turns(bench, rounds, TURNS, side, warm_up=False)


def main() -> None:
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("batch_engine").setLevel(logging.INFO)  # the plans the engine builds, between the turns
    labels = {"idled": "after an idle, nothing run", "checked": "right after the start check"}
    compare_lone(__doc__.splitlines()[0] if __doc__ else "", TURNS, labels, run)


if __name__ == "__main__":
    main()
