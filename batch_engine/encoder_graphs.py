"""The vision encoder replayed as a CUDA graph per image grid (`EncoderGraphs`), where the prefills replay theirs
(`EngineSettings.prefill_graphs`, `DeviceSteps.padded`).

A prefill's text model is one graph per length bucket, captured at start; the encoder before it is not, since images
come in many sizes. Yet one grid recurs (photos of one camera, scans of one page size, every 1024×1024 image): so where
the engine meets a grid of one image a second time, it captures the encoder for that grid there and then (a warm-up run,
the capture, a device synchronisation, on the engine's thread, holding up its other requests; its time and the memory it
took recorded in `captures`, which the GPU benchmarks print), and from then on an image of that grid costs the host one
copy of its pixels and one replay, where the encoder's blocks otherwise cost it their Python, their guards and every
kernel's launch (on a slow H100 host 33.9 ms of the host's time against 0.6, `bench/gpu_encoder_graphs.py`). The grid
fixes every other input (its positions, bounds and longest image, `images.encoder_inputs`, kept with the graph), so only
the pixels are copied in; the output, written into one tensor made outside the graph, is copied out at once, since the
next replay writes over it.

At most `GRIDS_KEPT` graphs are kept, the least recently used dropped (a grid dropped is counted anew, and captured
again at its next second meeting: more than that many grids recurring in turn would be captured over and over). Each
keeps its pixels and output (about 24 MB for a 1024×1024 image in bfloat16), and all share one memory pool of their own,
which holds the encoder's activations for the largest grid met; none of it is reserved at start (on an H100 a 1024×1024
image's grid took 55 ms to capture and 0.10 GiB more of the device's reserved memory). The arithmetic is the encoder's
own, launched in the same order: on an H100 the replayed output equalled the eager encoder's to the bit
(`tests/gpu/test_glm_gpu.py`, the encoder uncompiled). A capture that fails leaves its grid eager for good, with one
error in the log; after `FAILURES_TOLERATED` failures no grid is captured any more, those kept still replayed (a capture
that fails for one grid most likely fails for the next, and each try costs a warm-up run and a device synchronisation).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from cachetools import LRUCache

from batch_engine.graphs import capture_one, new_pool
from batch_engine.images import encoder_inputs

log = logging.getLogger("batch_engine")

GRIDS_KEPT = 8
"""Encoder graphs kept at most, one per image grid."""
GRIDS_COUNTED = 4096
"""Grids whose meetings are counted at most (`EncoderGraphs.met`)."""
FAILURES_TOLERATED = 3
"""Failed captures after which no grid is captured any more (those captured before still replay)."""


@dataclass(frozen=True)
class _Captured:
    """One grid's graph, the pixels it reads, the output it writes, and its other inputs (`images.encoder_inputs`):
    kept with it, since a graph holds no reference to the memory it reads, and memory freed would be handed to other
    tensors while the graph still reads it at each replay."""

    graph: Any
    pixels: Any
    output: Any
    inputs: dict[str, Any]


class EncoderGraphs:
    """The vision encoder `visual` on `device` as a CUDA graph per image grid, captured at the grid's second meeting
    (module docstring); only the engine's thread calls it."""

    def __init__(self, visual: Any, device: Any) -> None:
        self.visual = visual
        self.device = device
        self.captured: LRUCache[tuple[int, ...], _Captured] = LRUCache(maxsize=GRIDS_KEPT)
        self.met: LRUCache[tuple[int, ...], int] = LRUCache(maxsize=GRIDS_COUNTED)
        """How many times each grid not yet captured was met."""
        self.failed: set[tuple[int, ...]] = set()
        """The grids whose capture failed: eager (`FAILURES_TOLERATED` at most; then so is every grid not captured)."""
        self.replays = 0
        self.captures: deque[tuple[tuple[int, ...], float, float]] = deque(maxlen=GRIDS_KEPT)
        """The last `GRIDS_KEPT` captures that succeeded (grids dropped and captured again would grow a list without
        end): each one's grid, how long it took (ms, the warm-up run and the synchronisation included) and how much the
        device's reserved memory grew by meanwhile (GiB)."""
        self._pool: Any = None

    def encode(self, pixel_values: Any, grid: Any) -> Any | None:
        """The encoder's output (one row per image token) for one image's `pixel_values` (on the host or the device)
        of `grid` (on the host), replayed from that grid's graph, captured now at its second meeting; None where the
        caller runs the encoder itself (the grid's first meeting, several images, a failed capture)."""
        if grid.shape[0] != 1:  # several images: their attention splits per image, reading the bounds back
            return None
        key = tuple(int(size) for size in grid.flatten().tolist())
        held = self.captured.get(key)
        if held is None:
            if key in self.failed or len(self.failed) >= FAILURES_TOLERATED:  # the grids kept still replay
                return None
            self.met[key] = met = self.met.get(key, 0) + 1
            if met < 2:
                return None
            del self.met[key]  # captured or failed, it is counted no more
            held = self._capture(key, pixel_values, grid)
            if held is None:
                return None
        held.pixels.copy_(pixel_values, non_blocking=True)
        held.graph.replay()
        self.replays += 1
        return held.output.clone()

    def _capture(self, key: tuple[int, ...], pixel_values: Any, grid: Any) -> _Captured | None:
        """`grid`'s graph (its pixels first `pixel_values`), kept; None, logged, where capturing failed."""
        import torch

        started = time.perf_counter()
        reserved = torch.cuda.memory_reserved(self.device)
        visual = self.visual
        pixels = torch.empty(pixel_values.shape, dtype=visual.dtype, device=self.device)
        pixels.copy_(pixel_values, non_blocking=True)
        inputs = encoder_inputs(grid, visual, self.device)
        written: list[Any] = []

        def encoder() -> None:
            """The encoder on `pixels`, its output into the one tensor its first run made (where each replay leaves
            it): a copy of 11 MB for a 1024×1024 image."""
            output = visual(pixels, **inputs).pooler_output
            if written:
                written[0].copy_(output)
            else:
                written.append(output)

        try:
            if self._pool is None:
                self._pool = new_pool()
            # Other threads (a processor on the GPU, another engine) may use the device meanwhile: only this thread's
            # calls are checked for what a capture forbids.
            graph = capture_one(encoder, self._pool, error_mode="thread_local")
        except Exception:
            log.exception("batching engine: the vision encoder not captured for grid %s; it runs eagerly", key)
            self.failed.add(key)
            if (failures := len(self.failed)) >= FAILURES_TOLERATED:
                log.error("batching engine: %d encoder captures failed; no grid is captured from now on", failures)
            return None
        held = self.captured[key] = _Captured(graph, pixels, written[0], inputs)
        after, ms = torch.cuda.memory_reserved(self.device), (time.perf_counter() - started) * 1000
        self.captures.append((key, ms, (after - reserved) / 2**30))
        log.info(
            "batching engine: the vision encoder captured for grid %s in %.0f ms (%d kept); %.2f GiB reserved on the "
            "device after",
            "×".join(map(str, key)), ms, len(self.captured), after / 2**30,
        )  # fmt: skip
        return held

    def summary(self) -> str:
        """The grids kept, the replays, and each recorded capture's time and memory, as a benchmark's note."""
        taken = ", ".join(
            f"{'×'.join(map(str, grid))} in {ms:.0f} ms, {added:+.2f} GiB reserved" for grid, ms, added in self.captures
        )
        return (
            f"the vision encoder's CUDA graphs: {len(self.captured)} grid(s) kept, {self.replays} replays, "
            f"{len(self.failed)} failed capture(s); captured: {taken or 'none'}"
        )
