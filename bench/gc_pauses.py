"""The garbage collector's pauses in the service on its embedded models: its heap as loaded against frozen, in one run.

    .venv/bin/python -m bench.gc_pauses [--rounds 5] [--requests 50]

One process builds the app as `make run` serves it, but for its vision cache, off so that every request runs the models
(`create_app(Settings(cache=...))`: its lifespan loads the embedded models from the settings and then freezes what the
process holds, `stage_protocol.server.collector.frozen_heap`), then measures each side, the heap given back to the
collector (`gc.unfreeze`, as before the service froze it) and frozen again:

- a full collection (`gc.collect()`, the oldest generation: what Python runs on its own once enough objects have
  outlived the younger ones), p50 of `--rounds`, with how many objects the collector walks;
- `--requests` vision-only `POST /v1/analyze` on the receipt (in this process, over ASGI), one after the other: the
  collections Python ran on its own meanwhile, per generation, and their pauses; the requests' p50 and longest.

The passes of requests run as loaded, frozen, as loaded, frozen, a line each. The GPU benchmarks report the same
collections during their measures (`Collections`), with the engine's heap frozen as the service freezes it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from stage_protocol.server.collector import freeze

ROOT = Path(__file__).resolve().parents[1]
GENERATIONS = (0, 1, 2)


class Collections:
    """The collections Python runs while this is entered (`gc.callbacks`): each one's generation and pause in ms."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {generation: [] for generation in GENERATIONS}
        self._started: float | None = None

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.pauses[info["generation"]].append((time.perf_counter() - self._started) * 1000)
            self._started = None

    def __enter__(self) -> Collections:
        gc.callbacks.append(self)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        gc.callbacks.remove(self)

    def summary(self) -> str:
        """Per generation: how many collections ran, their total and longest pause."""
        return ", ".join(
            f"generation {generation}: {len(pauses)}"
            + (f" ({sum(pauses):.1f} ms, the longest {max(pauses):.1f})" if pauses else "")
            for generation, pauses in self.pauses.items()
        )


def full_collection_ms(rounds: int) -> float:
    """A full collection's pause as the heap now is (p50 of `rounds`, in ms)."""
    pauses = []
    for _ in range(rounds):
        started = time.perf_counter()
        gc.collect()
        pauses.append((time.perf_counter() - started) * 1000)
    return statistics.median(pauses)


def tracked() -> int:
    """How many objects a full collection walks now (those the collector tracks, less the frozen ones)."""
    return len(gc.get_objects())


def as_loaded_and_frozen(rounds: int) -> tuple[tuple[int, float], tuple[int, float]]:
    """A full collection's (objects walked, pause ms) with the heap given back to the collector, then frozen again
    (`stage_protocol.server.collector.freeze`, as the service freezes it); the heap is left frozen."""
    gc.unfreeze()
    loaded = (tracked(), full_collection_ms(rounds))
    freeze()
    return loaded, (tracked(), full_collection_ms(rounds))


async def _requests(client: Any, image: bytes, count: int) -> tuple[Collections, list[float]]:
    latencies = []
    with Collections() as collections:
        for _ in range(count):
            started = time.perf_counter()
            files = {"image": ("receipt.png", image, "image/png")}
            response = await client.post("/v1/analyze", files=files, data={"question": "What is the total?"})
            response.raise_for_status()
            latencies.append((time.perf_counter() - started) * 1000)
    return collections, latencies


async def run(rounds: int, requests: int, image: bytes) -> None:
    import httpx

    from orchestrator.api.app import create_app
    from orchestrator.settings import CacheSettings, Settings

    app = create_app(Settings(cache=CacheSettings(enabled=False)))
    async with app.router.lifespan_context(app):
        frozen_by_service = gc.get_freeze_count()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service", timeout=600) as client:
            await _requests(client, image, 3)  # warm-up
            (loaded_objects, loaded_ms), (frozen_objects, frozen_ms) = as_loaded_and_frozen(rounds)
            print(f"the service froze {frozen_by_service} objects once its models were loaded")
            print(f"| a full collection (p50 of {rounds}) | objects walked | pause, ms |")
            print("| --- | ---: | ---: |")
            print(f"| heap as loaded | {loaded_objects} | {loaded_ms:.2f} |")
            print(f"| heap frozen (the service) | {frozen_objects} | {frozen_ms:.3f} |")
            for side in ("as loaded", "frozen", "as loaded", "frozen"):
                if side == "as loaded":
                    gc.unfreeze()
                else:
                    freeze()
                collections, latencies = await _requests(client, image, requests)
                print(
                    f"- {requests} requests, heap {side}: p50 {statistics.median(latencies):.1f} ms, the longest "
                    f"{max(latencies):.1f} (request {latencies.index(max(latencies)) + 1}); collections Python ran "
                    f"meanwhile: {collections.summary()}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5, help="full collections timed a side (p50)")
    parser.add_argument("--requests", type=int, default=50, help="requests a pass")
    parser.add_argument("--image", type=Path, default=ROOT / "examples" / "receipt.png")
    args = parser.parse_args()
    asyncio.run(run(args.rounds, args.requests, args.image.read_bytes()))


if __name__ == "__main__":
    main()
