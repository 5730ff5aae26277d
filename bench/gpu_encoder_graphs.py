"""A lone request's first token through the batching engine with the vision encoder replayed as a CUDA graph of its
image's grid (`batch_engine.encoder_graphs`) against the encoder run as before (compiled, its blocks launched one by
one), the text prefill replayed as a CUDA graph on both sides (`EngineSettings.prefill_graphs` on), in one process.

    python bench/gpu_encoder_graphs.py [--rounds 8] [--image-side 1024]    # on the GPU machine
    python bench/gpu_encoder_graphs.py --tiny                              # the same code on a CPU

GLM-4.6V-Flash's full architecture with random weights in bfloat16, the engine as `bench/gpu_vision.py --compile`
builds it (32 slots, compiled layers) with the prefill graphs captured at start, the heap frozen as the service freezes
it. Before the turns two requests meet the images' grid (every image here is of one size), so that its graph is
captured before any timed request. The two sides take turns in the order eager, graphs, graphs, eager; each turn is
one warm-up request and `--rounds` lone requests, each on an image not seen before, timed by the engine
(`first_token_ms`: submit to first token). The table gives each side's p50 over its turns; a note lists the samples in
the order taken. Another note times the encoder alone on the caller's thread, the engine idle, eagerly and replayed
(p50 of 5 images each): the host's time to queue it (the call's return) against the device's time from its start to
its end; where the two are close, the host's launches set the encoder's pace.

`--tiny` runs a 2-layer model on the CPU, where nothing is captured: both sides run the encoder eagerly. It proves the
code path, measures nothing.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `bench`, `tests` and the engine importable
    sys.path.insert(0, str(ROOT))

from bench.gpu_alone import compare_lone, lone_turns  # noqa: E402
from bench.gpu_vision import Bench  # noqa: E402

TURNS = ("eager", "graphs", "graphs", "eager")
ALONE = 5
"""Images the encoder is timed alone on, each side (after one more, untimed)."""


def run(bench: Bench, rounds: int) -> tuple[dict[str, list[float]], list[str]]:
    """Each side's samples over its turns, and the samples of each turn in the order taken: `graphs` with the
    engine's encoder graphs as the engine keeps them, `eager` without them."""
    from unittest import mock

    device = bench.engine.device
    for seed in (6000, 6001):  # the grid met twice: captured (on a GPU)
        bench.engine_run([bench.prompt(seed)], 1)
    graphs = device.encoder_graphs

    def side(name: str) -> Any:
        return mock.patch.object(device, "encoder_graphs", graphs if name == "graphs" else None)

    return lone_turns(bench, rounds, TURNS, side)


def notes(bench: Bench) -> list[str]:
    """What the engine's encoder graphs hold after the turns, and the encoder alone (`encoder_alone`)."""
    graphs = bench.engine.device.encoder_graphs
    if graphs is None:
        return ["the encoder's graphs: none (nothing is captured on a CPU)", encoder_alone(bench)]
    return [graphs.summary(), encoder_alone(bench)]


def encoder_alone(bench: Bench) -> str:
    """The encoder alone on images not seen before, eagerly and replayed: the host's time to queue it and the
    device's from its start to its end (p50 of `ALONE` each), as a note."""
    import torch

    from batch_engine.images import encode_images

    cuda = bench.device == "cuda"
    graphs = bench.engine.device.encoder_graphs
    timed: dict[str, list[tuple[float, float]]] = {"eager": [], "graphs": []}
    seeds = iter(range(8000, 10**6))
    with torch.inference_mode():
        for side, used in (("eager", None), ("graphs", graphs)):
            for _ in range(ALONE + 1):
                prompt = bench.engine.prepare(bench.prompt(next(seeds)), None)
                bench.sync()
                marks = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else []  # type: ignore[no-untyped-call]
                started = time.perf_counter()
                if marks:
                    marks[0].record()
                encode_images(prompt, bench.model, None, used)
                queued = (time.perf_counter() - started) * 1000
                if marks:
                    marks[1].record()
                bench.sync()
                ran = marks[0].elapsed_time(marks[1]) if marks else (time.perf_counter() - started) * 1000
                timed[side].append((queued, ran))
    parts = []
    for side, pairs in timed.items():
        queued = statistics.median(pair[0] for pair in pairs[1:])
        ran = statistics.median(pair[1] for pair in pairs[1:])
        parts.append(f"{side} queued by the host in {queued:.1f} ms, {ran:.1f} ms on the device")
    return f"the encoder alone (p50 of {ALONE}, the engine idle): " + "; ".join(parts)


def main() -> None:
    labels = {"eager": "the encoder as before", "graphs": "a CUDA graph of its grid"}
    compare_lone(__doc__.splitlines()[0] if __doc__ else "", TURNS, labels, run, notes, prefill_graphs=True)


if __name__ == "__main__":
    main()
