"""A lone request's first token through the batching engine right after the `glm` backend's start check
(`GlmEngine.check_batching`: plain `generate` eagerly for 8 tokens of the warm-up image, then the engine on the same
image) against with nothing run before it, in one process.

    python bench/gpu_start_check.py [--rounds 8] [--image-side 1024]    # on the GPU machine
    python bench/gpu_start_check.py --tiny                              # the same code on a CPU

A service runs that check once, after the engine starts and before its first request. In `bench/gpu_vision.py` the
engine's lone first tokens were 91.8–97.2 ms on an H100 when plain `generate`'s own measures had run just before them,
and 60.8–63.7 in a process that ran the engine alone (bench/RESULTS.md): this measures whether the check's much smaller
plain `generate` does the same to a service's first requests.

GLM-4.6V-Flash's full architecture with random weights in bfloat16, the engine as `bench/gpu_vision.py --compile`
builds it (32 slots, compiled layers), the heap frozen as the service freezes it, one untimed request after the start.
The two sides take turns in the order alone, checked, checked, alone; a `checked` turn runs the check once, then its
requests. Each turn is `--rounds` lone requests with no warm-up of its own (the first request after the check is the
one a service's first client meets), each on an image not seen before, timed by the engine (`first_token_ms`: submit
to first token). The table gives each side's p50 over its turns; a note lists the samples in the order taken, where an
effect that fades shows as slow first samples of a turn, and one that lasts as a slow `alone` turn after a `checked`
one.

`--tiny` runs a 2-layer model on the CPU: it proves the code path, measures nothing.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `bench`, `tests` and the stage packages importable
    sys.path.insert(0, str(ROOT))

from bench.gpu_alone import compare_lone, engine_lone_requests, lone_turns  # noqa: E402
from bench.gpu_vision import Bench  # noqa: E402

TURNS = ("alone", "checked", "checked", "alone")


def backend_engine(bench: Bench) -> Any:
    """The `glm` backend's `GlmEngine` over the benchmark's model, processor and started batching engine."""
    from vision_stage.glm_codec import GlmCodec
    from vision_stage.glm_engine import GlmEngine

    return GlmEngine(bench.model, GlmCodec.for_model(bench.processor, bench.model), batch=bench.engine)


def run(bench: Bench, rounds: int) -> tuple[dict[str, list[float]], list[str]]:
    """Each side's samples over its turns, and the samples of each turn in the order taken: `checked` turns begin
    with `GlmEngine.check_batching`, `alone` turns with nothing."""
    backend = backend_engine(bench)

    @contextlib.contextmanager
    def side(name: str) -> Iterator[None]:
        if name == "checked":
            backend.check_batching()  # its answer (near-ties of random weights may part) is not what is measured
        yield

    engine_lone_requests(bench, 0, lambda: bench.prompt(6999))  # the one untimed request after the start
    return lone_turns(bench, rounds, TURNS, side, warm_up=False)


def main() -> None:
    labels = {"alone": "nothing run before", "checked": "right after the start check"}
    compare_lone(__doc__.splitlines()[0] if __doc__ else "", TURNS, labels, run)


if __name__ == "__main__":
    main()
