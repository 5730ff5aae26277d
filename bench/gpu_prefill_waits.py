"""A lone request's first token through the batching engine with a prefill's images placed as the engine places them
(`batch_engine.images`: nothing read back from the device, so the text model's launches queue behind the encoder's)
against as it placed them before (transformers' `get_image_features`, whose split per image reads the grid back from
the device, and a mask on the device, whose count is read back: the host waits for the whole encoder), in one process.

    python bench/gpu_prefill_waits.py [--rounds 8] [--image-side 1024]    # on the GPU machine
    python bench/gpu_prefill_waits.py --tiny                              # the same code on a CPU

GLM-4.6V-Flash's full architecture with random weights in bfloat16, the engine as `bench/gpu_vision.py --compile`
builds it (32 slots, compiled layers), the heap frozen as the service freezes it. The two placements take turns in the
order before, engine, engine, before (a machine that drifts within the run weighs on both sides alike); each turn is
one warm-up request and `--rounds` lone requests, each on an image not seen before, timed by the engine
(`first_token_ms`: submit to first token). The table gives each side's p50 over its turns; a note lists the samples in
the order taken. The baseline is the earlier placement as code here (`before`), swapped in for the engine's. Both
launch the encoder eagerly: its graphs (`batch_engine.encoder_graphs`, on where the prefills replay theirs) are set
aside for the run.

`--tiny` runs a 2-layer model on the CPU: it proves the code path, measures nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `bench`, `tests` and the engine importable
    sys.path.insert(0, str(ROOT))

from bench.gpu_alone import compare_lone, lone_turns  # noqa: E402
from bench.gpu_vision import Bench  # noqa: E402

TURNS = ("before", "engine", "engine", "before")


def before(embeds: Any, prompt: Any, model: Any, store: Any, graphs: Any = None) -> None:
    """The placement the engine made until 4c5d6e3 (its encoder store and graphs aside; the prefill's other copies
    stay as the engine now makes them): transformers' `get_image_features` (the grid on the device, read back to split
    the output per image, joined again), then a mask on the device."""
    import torch

    grid = prompt.grid
    output = model.model.get_image_features(
        prompt.pixel_values.to(model.device),
        image_grid_thw=grid.to(model.device),
        max_seqlen=int((grid[:, 1] * grid[:, 2]).max()),
        return_dict=True,
    )
    ids = prompt.ids.to(model.device)
    embeds[ids == model.config.image_token_id] = torch.cat(tuple(output.pooler_output), dim=0).to(embeds.dtype)


def run(bench: Bench, rounds: int) -> tuple[dict[str, list[float]], list[str]]:
    """Each placement's samples over its turns, and the samples of each turn in the order taken."""
    from unittest import mock

    import batch_engine.steps
    from batch_engine.images import place_images

    placements: dict[str, Callable[..., None]] = {"before": before, "engine": place_images}
    # the encoder launched as the engine launches it eagerly on both sides, never replayed as a graph of its grid
    with mock.patch.object(bench.engine.device, "encoder_graphs", None):
        # what `prefill` calls
        return lone_turns(
            bench, rounds, TURNS, lambda side: mock.patch.object(batch_engine.steps, "place_images", placements[side])
        )


def main() -> None:
    labels = {"before": "get_image_features and a mask", "engine": "batch_engine.images"}
    compare_lone(__doc__.splitlines()[0] if __doc__ else "", TURNS, labels, run)


if __name__ == "__main__":
    main()
