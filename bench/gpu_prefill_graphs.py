"""A lone request's first token through the batching engine with its text prefill padded to a length bucket and
replayed as a CUDA graph (`EngineSettings.prefill_graphs`, on here; by default on where the host launches slowly)
against the prefill as the engine runs it otherwise (eagerly: the host running the forty compiled layers' Python and
launches one by one), in one process.

    python bench/gpu_prefill_graphs.py [--rounds 8] [--image-side 1024]    # on the GPU machine
    python bench/gpu_prefill_graphs.py --tiny                              # the same code on a CPU

GLM-4.6V-Flash's full architecture with random weights in bfloat16, the engine as `bench/gpu_vision.py --compile`
builds it (32 slots, compiled layers) with the prefill graphs captured at start, the heap frozen as the service freezes
it. The two take turns in the order eager, graphs, graphs, eager (a machine that drifts within the run weighs on both
sides alike); each turn is one warm-up request and `--rounds` lone requests, each on an image not seen before, timed
by the engine (`first_token_ms`: submit to first token). Both run the vision encoder compiled, not captured: its own
graphs (`batch_engine.encoder_graphs`, which the engine replays with the prefills') are set aside for the run, and
`bench/gpu_encoder_graphs.py` compares them. The table gives each side's p50 over its turns; a note lists the samples
in the order taken.

`--tiny` runs a 2-layer model on the CPU, where nothing is captured: the `graphs` side runs the padded prefill
eagerly. It proves the code path, measures nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `bench`, `tests` and the engine importable
    sys.path.insert(0, str(ROOT))

from bench.gpu_alone import compare_lone, lone_turns  # noqa: E402
from bench.gpu_vision import Bench  # noqa: E402

TURNS = ("eager", "graphs", "graphs", "eager")


def run(bench: Bench, rounds: int) -> tuple[dict[str, list[float]], list[str]]:
    """Each side's samples over its turns, and the samples of each turn in the order taken: `graphs` with the
    engine's prefills padded (replaying their graphs where captured), `eager` with them as before."""
    from unittest import mock

    device = bench.engine.device
    with mock.patch.object(device, "encoder_graphs", None):  # the text prefill's graphs alone
        return lone_turns(bench, rounds, TURNS, lambda side: mock.patch.object(device, "padded", side == "graphs"))


def main() -> None:
    labels = {"eager": "the prefill as before", "graphs": "padded, a CUDA graph"}
    compare_lone(__doc__.splitlines()[0] if __doc__ else "", TURNS, labels, run, prefill_graphs=True)


if __name__ == "__main__":
    main()
