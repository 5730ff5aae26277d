"""Latency of the service on the embedded models, against calling the same stages directly, in one run.

    .venv/bin/python bench/embedded.py [--rounds 10] [--max-new-tokens 64] [--image examples/receipt.png]

One process, one event loop, one set of loaded backends. Each round makes four measurements on the same image, in
an order that alternates between rounds:

- direct, vision-only: the vision backend's `generate` (the `answer` task), nothing else;
- service, vision-only: `POST /v1/analyze` over loopback HTTP with a perception question (router → vision);
- direct, vision-then-reasoning: the vision backend (`describe`), then the reasoning backend on the same prompt the
  pipeline builds;
- service, vision-then-reasoning: `POST /v1/analyze` with a question carrying a reasoning cue.

It prints p50/p95 of each, and the ratio service/direct: what routing (the configured router: by default one
embedding query), HTTP, multipart parsing, image decoding and response building add on top of the models themselves.
Greedy decoding makes the direct and service reasoning calls generate the same tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import uvicorn

from orchestrator.analysis.messages import detect_language
from orchestrator.analysis.prompts import reasoning_messages
from orchestrator.api.app import create_app
from orchestrator.settings import CacheSettings, Settings
from orchestrator.stage_settings import LocalReasoningSettings, ReasoningSettings
from orchestrator.wiring import Backends, build_backends, build_router
from reasoning_stage.types import ReasoningRequest
from stage_protocol.server.collector import frozen_heap
from vision_stage.images import ImageLimits, decode_image
from vision_stage.types import VisionRequest

ROOT = Path(__file__).resolve().parents[1]
VISION_QUESTION = "What is the total?"
REASONING_QUESTION = "Should this receipt be reimbursed as a business expense? Explain briefly."


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def timed(call: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await call()
    return (time.perf_counter() - started) * 1000.0


class Bench:
    def __init__(self, backends: Backends, settings: ReasoningSettings, image: bytes, client: httpx.AsyncClient):
        self.backends, self.settings, self.image, self.client = backends, settings, image, client
        self.decoded = decode_image(image, ImageLimits())

    async def direct_vision(self) -> None:
        await self.backends.vision.generate(VisionRequest(self.decoded, VISION_QUESTION, task="answer"))

    async def direct_reasoning(self) -> None:
        vision = await self.backends.vision.generate(VisionRequest(self.decoded, REASONING_QUESTION, task="describe"))
        messages = reasoning_messages(vision, REASONING_QUESTION, "general", detect_language(REASONING_QUESTION))
        await self.backends.reasoning.generate(
            ReasoningRequest(messages, self.settings.max_new_tokens, self.settings.temperature)
        )

    async def service(self, question: str, expected_mode: str) -> None:
        files = {"image": ("receipt.png", self.image, "image/png")}
        response = await self.client.post("/v1/analyze", files=files, data={"question": question})
        response.raise_for_status()
        mode = response.json()["mode"]
        if mode != expected_mode:
            raise RuntimeError(f"expected mode {expected_mode}, got {mode}: {response.text[:300]}")

    def cases(self) -> dict[str, Callable[[], Awaitable[None]]]:
        return {
            "direct vision-only": self.direct_vision,
            "service vision-only": lambda: self.service(VISION_QUESTION, "vision_only"),
            "direct vision-then-reasoning": self.direct_reasoning,
            "service vision-then-reasoning": lambda: self.service(REASONING_QUESTION, "vision_then_reasoning"),
        }


async def run(rounds: int, max_new_tokens: int, image: bytes) -> dict[str, list[float]]:
    # The same image throughout: with the vision cache on, every round after the first would measure a cache hit.
    settings = Settings(
        reasoning=LocalReasoningSettings(max_new_tokens=max_new_tokens), cache=CacheSettings(enabled=False)
    )
    backends = await build_backends(settings)
    app = create_app(settings, backends, router=await build_router(settings.router))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    serving = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110  (uvicorn exposes a flag, not an event)
        await asyncio.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    samples: dict[str, list[float]] = {}
    # the heap frozen as the service freezes it once loaded (an app given its backends leaves that to its caller)
    with frozen_heap():
        await _measure(backends, settings, image, port, rounds, samples)
    server.should_exit = True
    await serving
    return samples


async def _measure(
    backends: Backends, settings: Settings, image: bytes, port: int, rounds: int, samples: dict[str, list[float]]
) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
        bench = Bench(backends, settings.reasoning, image, client)
        cases = list(bench.cases().items())
        for _, call in cases:  # warm-up, not counted
            await call()
        for round_ in range(rounds):
            for name, call in cases if round_ % 2 == 0 else cases[::-1]:
                samples.setdefault(name, []).append(await timed(call))


def report(samples: dict[str, list[float]], rounds: int, max_new_tokens: int) -> None:
    print(f"\n{rounds} rounds, max_new_tokens={max_new_tokens}, latency in ms")
    print(f"{'case':32} {'p50':>9} {'p95':>9} {'mean':>9}")
    for name, values in samples.items():
        p50, p95 = percentile(values, 0.5), percentile(values, 0.95)
        print(f"{name:32} {p50:9.1f} {p95:9.1f} {statistics.fmean(values):9.1f}")
    for route in ("vision-only", "vision-then-reasoning"):
        direct, service = samples[f"direct {route}"], samples[f"service {route}"]
        ratio = percentile(service, 0.5) / percentile(direct, 0.5)
        added = percentile(service, 0.5) - percentile(direct, 0.5)
        print(f"{route}: service/direct p50 ratio {ratio:.3f} ({added:+.1f} ms added by the service)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--image", type=Path, default=ROOT / "examples" / "receipt.png")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    samples = asyncio.run(run(args.rounds, args.max_new_tokens, args.image.read_bytes()))
    report(samples, args.rounds, args.max_new_tokens)


if __name__ == "__main__":
    main()
