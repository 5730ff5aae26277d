"""Load on the orchestrator over HTTP, against fast fake stages on loopback, beside the same stage calls made directly.

    .venv/bin/python -m bench.load [--requests 10000] [--concurrency 200]

Four processes, so that no two share a GIL: this one (the client), the orchestrator (`python -m orchestrator serve`
with both stages `remote`), and one `tests.faulty_server.FaultyServer` per stage under uvicorn. Two scenarios, each
with fresh processes:

- `healthy`: both fakes answer every request (`ok`);
- `flaky reasoning`: the reasoning fake fails half its requests with a 500 (`flaky`, seeded). Every request must
  still get a 200, marked `degraded` when the reasoning stage did not answer.

In each scenario the client first calls the fakes directly, at the same concurrency, with the stage clients the
orchestrator uses (`RemoteVisionBackend`, `RemoteReasoningBackend`) and the calls the pipeline makes (vision-only:
one `answer`; reasoning: `describe`, then the reasoning stage, then `answer` when that failed): a fifth as many
requests by default (`--direct-requests`), enough for a p99 in less time. Then it sends its requests, half
`"mode": "vision"` and half `"mode": "reasoning"`, to `POST /v1/analyze`. It prints throughput, p50 and p99 latency
of both and what the orchestrator adds (its latency minus the direct one), the statuses, how many answers were
degraded or lost, the CPU time of each process, and the orchestrator's peak resident memory (VmHWM). It exits 1
when any request through the orchestrator got no 200.

Last, the replicas run (`--replicas-only` runs it alone): a `redis-server` on loopback, one orchestrator with
`ORCH_STATE__URL` (sessions and rate limits counted in Redis) and the same requests to it, then a second replica
sharing that Redis and the requests sent to the two in turn; it prints both runs' throughput and latency, and what
the second replica changed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any

import httpx
from PIL import Image, ImageDraw

from bench.load_report import Kind, Measured, Options, Phase, Sample, report, report_replicas
from bench.processes import Child, child_process, cpu_s, peak_kib
from reasoning_stage.errors import ReasoningError
from reasoning_stage.remote import RemoteReasoningBackend
from reasoning_stage.types import ChatMessage, ReasoningRequest
from tests.faulty_server import MODES, Faults, FaultyServer, Mode
from tests.servers import unused_port
from vision_stage.images import ImageLimits, decode_image
from vision_stage.remote import RemoteVisionBackend
from vision_stage.types import DecodedImage, VisionRequest

VISION_MODEL, REASONING_MODEL = "fake-vision", "fake-reasoning"
QUESTIONS = {"vision": "What is the total on this receipt?", "reasoning": "Is this receipt a business expense?"}
REQUEST_TIMEOUT_S = 60.0
STARTUP_TIMEOUT_S = 180.0
SCENARIOS: tuple[tuple[str, Mode], ...] = (("healthy", "ok"), ("flaky reasoning", "flaky"))
"""Each scenario's name and the reasoning fake's mode (the vision fake is always `ok`)."""


# --- processes --------------------------------------------------------------------------------------------------------


def start_fake(stack: ExitStack, model: str, mode: Mode, seed: int) -> Child:
    port = unused_port()
    args = ["-m", "bench.load", "--seed", str(seed), "fake", "--port", str(port), "--model", model, "--mode", mode]
    return stack.enter_context(child_process(model, args, port))


def start_orchestrator(
    stack: ExitStack, vision: Child, reasoning: Child, state_url: str | None = None, name: str = "orchestrator"
) -> Child:
    port = unused_port()
    env = (
        os.environ
        | ({"ORCH_STATE__URL": state_url} if state_url else {})
        | {
            "ORCH_VISION__BACKEND": "remote",
            "ORCH_VISION__BASE_URL": f"{vision.url}/v1",
            "ORCH_VISION__MODEL": VISION_MODEL,
            "ORCH_REASONING__BACKEND": "remote",
            "ORCH_REASONING__BASE_URL": f"{reasoning.url}/v1",
            "ORCH_REASONING__MODEL": REASONING_MODEL,
            "ORCH_ARBITRATION__PROBES": "off",
            "ORCH_ARBITRATION__WITNESS": "off",  # the gateway's overhead, not the embedded OCR's reading
            "ORCH_LOG_LEVEL": "warning",  # no access log line per request
            # every request must reach the stages (one image is sent throughout), and one client sends all the load
            "ORCH_CACHE__ENABLED": "false",
            "ORCH_RATE_LIMIT__REQUESTS_PER_S": "1000000",
            "ORCH_RATE_LIMIT__BURST": "1000000",
            "ORCH_RATE_LIMIT__MAX_CONCURRENT": "100000",
        }
    )
    args = ["-m", "orchestrator", "serve", "--host", "127.0.0.1", "--port", str(port)]
    return stack.enter_context(child_process(name, args, port, env))


async def wait_ready(child: Child, path: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    async with httpx.AsyncClient(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if child.process.poll() is not None:
                raise RuntimeError(f"{child.name} exited with {child.process.returncode}:\n{child.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(child.url + path)).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{child.name} was not ready within {STARTUP_TIMEOUT_S:g} s:\n{child.log_tail()}")


# --- load -------------------------------------------------------------------------------------------------------------


def kind_of(index: int) -> Kind:
    return "reasoning" if index % 2 else "vision"


async def drive(requests: int, concurrency: int, call: Callable[[int], Awaitable[Sample]], limit_s: float) -> Phase:
    """`call(0)` … `call(requests - 1)` from `concurrency` workers; what is unfinished at `limit_s` is not counted."""
    samples: list[Sample] = []
    indices = iter(range(requests))

    async def worker() -> None:
        for index in indices:
            samples.append(await call(index))

    started = time.perf_counter()
    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    _, pending = await asyncio.wait(tasks, timeout=limit_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return Phase(samples, time.perf_counter() - started)


async def measure(
    call: Callable[[int], Awaitable[Sample]], requests: int, options: Options, children: list[Child]
) -> Phase:
    """A short warm-up, then `requests` timed, with the CPU time each process spent on them."""
    await drive(min(50, requests), min(10, options.concurrency), call, options.phase_limit_s)
    before = {"client": time.process_time()} | {child.name: cpu_s(child.process.pid) for child in children}
    phase = await drive(requests, options.concurrency, call, options.phase_limit_s)
    after = {"client": time.process_time()} | {child.name: cpu_s(child.process.pid) for child in children}
    return replace(phase, cpu_s={name: after[name] - before[name] for name in before})


def analyze_call(client: httpx.AsyncClient, urls: list[str], image_b64: str) -> Callable[[int], Awaitable[Sample]]:
    """`POST /v1/analyze`, the `index`-th request to the `index`-th of `urls` in turn (a round-robin balancer)."""

    async def call(index: int) -> Sample:
        kind = kind_of(index)
        body = {"image_base64": image_b64, "question": QUESTIONS[kind], "mode": kind}
        started = time.perf_counter()
        try:
            response = await client.post(urls[index % len(urls)], json=body)
        except httpx.HTTPError as exc:
            return Sample(kind, type(exc).__name__, time.perf_counter() - started)
        seconds = time.perf_counter() - started
        if response.status_code != 200:
            return Sample(kind, str(response.status_code), seconds)
        answer = response.json()
        failures = tuple(str(failure.get("error_type")) for failure in answer.get("failures") or [])
        return Sample(kind, "200", seconds, bool(answer.get("degraded")), failures)

    return call


@dataclass(frozen=True)
class Direct:
    """The pipeline's stage calls, made straight to the fakes with the orchestrator's own stage clients."""

    vision: RemoteVisionBackend
    reasoning: RemoteReasoningBackend
    image: DecodedImage

    async def call(self, index: int) -> Sample:
        kind = kind_of(index)
        started = time.perf_counter()
        try:
            degraded = await self._stages(kind, QUESTIONS[kind])
        except Exception as exc:  # reported as a failure of this request, whatever it was
            return Sample(kind, type(exc).__name__, time.perf_counter() - started)
        return Sample(kind, "ok", time.perf_counter() - started, degraded)

    async def _stages(self, kind: Kind, question: str) -> bool:
        """True when the reasoning stage failed and the vision stage answered instead (a degraded answer)."""
        if kind == "vision":
            await self.vision.generate(VisionRequest(self.image, question, task="answer"))
            return False
        described = await self.vision.generate(VisionRequest(self.image, question, task="describe"))
        chat = (ChatMessage("system", "Answer from the description."), ChatMessage("user", described.description))
        try:
            await self.reasoning.generate(ReasoningRequest(chat, max_new_tokens=192))
        except ReasoningError:
            await self.vision.generate(VisionRequest(self.image, question, task="answer"))
            return True
        return False


# --- one scenario -----------------------------------------------------------------------------------------------------


def bench_image() -> bytes:
    """A small receipt-like PNG."""
    image = Image.new("RGB", (160, 120), "white")
    draw = ImageDraw.Draw(image)
    for row, text in enumerate(("CORNER SHOP", "Coffee 3.50", "TOTAL 3.50")):
        draw.text((12, 14 + 32 * row), text, fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def direct_phase(vision: Child, reasoning: Child, image: bytes, options: Options) -> Phase:
    """The stage calls of each request, made from this process straight to the fakes."""
    see = await RemoteVisionBackend.load(base_url=f"{vision.url}/v1", model=VISION_MODEL, timeout_s=REQUEST_TIMEOUT_S)
    think = await RemoteReasoningBackend.load(
        base_url=f"{reasoning.url}/v1", model=REASONING_MODEL, timeout_s=REQUEST_TIMEOUT_S
    )
    try:
        direct = Direct(see, think, decode_image(image, ImageLimits()))
        return await measure(direct.call, options.direct_requests, options, [vision, reasoning])
    finally:
        await see.aclose()
        await think.aclose()


async def service_phase(children: list[Child], image: bytes, options: Options, replicas: int = 1) -> Phase:
    """`POST /v1/analyze` to the orchestrator (the last `replicas` of `children`, in turn)."""
    # Idle connections are dropped after 1 s, well before uvicorn's 5 s keep-alive: with httpx's default (also 5 s)
    # a request now and then goes out on a connection the server is closing, and fails with a reset.
    limits = httpx.Limits(
        max_connections=options.concurrency, max_keepalive_connections=options.concurrency, keepalive_expiry=1.0
    )
    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
        urls = [f"{child.url}/v1/analyze" for child in children[-replicas:]]
        call = analyze_call(client, urls, base64.b64encode(image).decode("ascii"))
        return await measure(call, options.requests, options, children)


async def served(fake: Child) -> Counter[str]:
    async with httpx.AsyncClient(timeout=10.0) as client:
        stats: dict[str, Any] = (await client.get(f"{fake.url}/stats")).json()
    return Counter({str(mode): int(count) for mode, count in stats["served"].items()})


async def run_scenario(reasoning_mode: Mode, options: Options) -> Measured:
    image = bench_image()
    with ExitStack() as stack:
        vision = start_fake(stack, VISION_MODEL, "ok", options.seed)
        reasoning = start_fake(stack, REASONING_MODEL, reasoning_mode, options.seed)
        orchestrator = start_orchestrator(stack, vision, reasoning)
        for child, path in ((vision, "/health"), (reasoning, "/health"), (orchestrator, "/ready")):
            await wait_ready(child, path)
        direct = await direct_phase(vision, reasoning, image, options)
        before = await served(reasoning)
        service = await service_phase([vision, reasoning, orchestrator], image, options)
        reasoning_served = dict((await served(reasoning)) - before)
        return Measured(direct, service, peak_kib(orchestrator.process.pid), reasoning_served)


async def run_replicas(options: Options) -> tuple[Phase, Phase]:
    """One orchestrator with a Redis (`ORCH_STATE__URL`: sessions and rate limits counted there), then two sharing
    it behind a round-robin client, against the same healthy fakes."""
    from tests.redis_server import redis_server

    image = bench_image()
    with ExitStack() as stack:
        state_url, _ = stack.enter_context(redis_server())
        vision = start_fake(stack, VISION_MODEL, "ok", options.seed)
        reasoning = start_fake(stack, REASONING_MODEL, "ok", options.seed)
        first = start_orchestrator(stack, vision, reasoning, state_url, "orchestrator-1")
        for child, path in ((vision, "/health"), (reasoning, "/health"), (first, "/ready")):
            await wait_ready(child, path)
        one = await service_phase([vision, reasoning, first], image, options)
        second = start_orchestrator(stack, vision, reasoning, state_url, "orchestrator-2")
        await wait_ready(second, "/ready")
        two = await service_phase([vision, reasoning, first, second], image, options, replicas=2)
        return one, two


# --- command line -----------------------------------------------------------------------------------------------------


def serve_fake(port: int, model: str, mode: Mode, seed: int) -> None:
    import uvicorn

    server = FaultyServer(model, default=mode, faults=Faults(flaky_rate=0.5, seed=seed))
    uvicorn.run(server.app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000, help="requests per phase (default: 10000)")
    parser.add_argument("--direct-requests", type=int, help="requests of the direct phase (default: a fifth)")
    parser.add_argument("--concurrency", type=int, default=200, help="requests in flight (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="the flaky fake's seed (default: 0)")
    parser.add_argument("--phase-limit-s", type=float, default=600.0, help="longest phase (default: 600)")
    parser.add_argument(
        "--replicas-only", action="store_true", help="only the two-replica run (one Redis; needs redis-server)"
    )
    commands = parser.add_subparsers(dest="command")
    fake = commands.add_parser("fake", help="(used by the bench) serve one FaultyServer")
    fake.add_argument("--port", type=int, required=True)
    fake.add_argument("--model", required=True)
    fake.add_argument("--mode", required=True, choices=MODES)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.command == "fake":
        serve_fake(args.port, args.model, args.mode, args.seed)
        return 0
    direct = args.direct_requests if args.direct_requests is not None else max(1, args.requests // 5)
    options = Options(args.requests, direct, args.concurrency, args.seed, args.phase_limit_s)
    problems: list[str] = []
    for scenario, reasoning_mode in () if args.replicas_only else SCENARIOS:
        measured = asyncio.run(run_scenario(reasoning_mode, options))
        problems += report(scenario, reasoning_mode, measured, options)
    problems += report_replicas(*asyncio.run(run_replicas(options)), options)
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
