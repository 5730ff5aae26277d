"""What the gateway benchmark (`bench/overhead_vs_litellm.py`) sends and how: the two request kinds, the sequential
and concurrent batches, and what each target's samples hold."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
from PIL import Image

from bench.processes import process_ticks

QUESTION = "What is in this image?"
MODEL = "vision-only"
JSON_HEADERS = {"content-type": "application/json"}
CONCURRENCY = 32


@dataclass(frozen=True)
class Kind:
    name: str
    image: bytes
    size: tuple[int, int]

    @property
    def body(self) -> bytes:
        url = "data:image/png;base64," + base64.b64encode(self.image).decode("ascii")
        parts = [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": url}}]
        return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": parts}]}).encode()

    def describe(self) -> str:
        width, height = self.size
        return (
            f"{self.name}: {QUESTION!r} + a {width}×{height} PNG of {len(self.image):,} bytes as a data: URL; "
            f"body {len(self.body):,} bytes, the same to every target"
        )


def png(width: int, height: int, seed: int = 0) -> bytes:
    """An RGB PNG of deterministic noise (noise barely compresses: the PNG is about 3 bytes a pixel)."""
    pixels = Image.frombytes("RGB", (width, height), random.Random(seed).randbytes(width * height * 3))
    buffer = io.BytesIO()
    pixels.save(buffer, format="PNG")
    return buffer.getvalue()


def noise_png(target_bytes: int) -> Kind:
    """A square-ish noise PNG within about 1% of `target_bytes`."""
    side = round((target_bytes / 3) ** 0.5)
    height = side
    for _ in range(3):
        data = png(side, height)
        height = max(1, round(height * target_bytes / len(data)))
    data = png(side, height)
    return Kind("image", data, (side, height))


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    pid: int
    """The process whose CPU time a request to `url` costs (the stage's, for direct)."""


@dataclass
class Samples:
    latencies_ms: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    errors_c1: int = 0
    errors_c32: int = 0
    first_error: str | None = None
    cpu_ticks: int = 0
    requests: int = 0
    stage_calls: int = 0

    @property
    def cpu_ms(self) -> float:
        """The target process's CPU time per request, over every measured request."""
        return 1000.0 * self.cpu_ticks / os.sysconf("SC_CLK_TCK") / self.requests if self.requests else float("nan")


async def send(client: httpx.AsyncClient, url: str, body: bytes) -> str | None:
    """None when the gateway answered 200, else what went wrong."""
    try:
        response = await client.post(url, content=body, headers=JSON_HEADERS)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if response.status_code == 200 else f"HTTP {response.status_code}: {response.text[:300]}"


@contextlib.asynccontextmanager
async def charged(target: Target, requests: int, stage: httpx.AsyncClient, into: Samples) -> AsyncIterator[None]:
    """Count into `into` the `requests`, the CPU time `target`'s process spends meanwhile, and the chat requests the
    stage receives meanwhile (one per request, unless a gateway caches, retries or asks more)."""
    ticks, calls = process_ticks(target.pid), await stage_calls(stage)
    yield
    into.cpu_ticks += process_ticks(target.pid) - ticks
    into.stage_calls += await stage_calls(stage) - calls
    into.requests += requests


async def stage_calls(stage: httpx.AsyncClient) -> int:
    return int((await stage.get("/bench/calls")).text)


async def latency_batch(client: httpx.AsyncClient, url: str, body: bytes, requests: int, into: Samples) -> None:
    for _ in range(requests):
        started = time.perf_counter()
        error = await send(client, url, body)
        if error is None:
            into.latencies_ms.append((time.perf_counter() - started) * 1000.0)
        else:
            into.errors_c1 += 1
            into.first_error = into.first_error or error


async def throughput_batch(
    client: httpx.AsyncClient, url: str, body: bytes, requests: int, deadline_s: float, into: Samples
) -> None:
    left, ok = requests, 0

    async def worker() -> None:
        nonlocal left, ok
        while left > 0:
            left -= 1
            error = await send(client, url, body)
            ok += error is None
            into.first_error = into.first_error or error

    started = time.perf_counter()
    try:
        async with asyncio.timeout(deadline_s), asyncio.TaskGroup() as group:
            for _ in range(CONCURRENCY):
                group.create_task(worker())
    except TimeoutError:
        into.first_error = into.first_error or f"a throughput batch hit its {deadline_s:g} s deadline"
    into.rps.append(ok / (time.perf_counter() - started))
    into.errors_c32 += requests - ok


async def check(client: httpx.AsyncClient, stage: httpx.AsyncClient, target: Target, body: bytes) -> str:
    """One request, its answer checked; returns what the stage received for it."""
    name, url = target.name, target.url
    response = await client.post(url, content=body, headers=JSON_HEADERS)
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, LookupError, TypeError):
        content = None
    if response.status_code != 200 or not isinstance(content, str) or not content:
        raise RuntimeError(f"{name} answered HTTP {response.status_code} at {url}: {response.text[:500]}")
    seen = (await stage.get("/bench/last")).json()
    images = ", ".join(f"{chars:,}" for chars in seen["image_url_chars"])
    fields = ", ".join(seen["fields"])
    return f"stage got {seen['bytes']:,} bytes, stream={seen['stream']}, image URL chars {images}; fields {fields}"


async def measure(
    kinds: list[Kind], targets: list[Target], stage: str, args: argparse.Namespace
) -> dict[str, dict[str, Samples]]:
    """Each target gets its own client (connection pool), so that no target's idle connections weigh on another's."""
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with contextlib.AsyncExitStack() as stack:
        clients = {
            name: await stack.enter_async_context(
                httpx.AsyncClient(base_url=base, timeout=args.timeout, limits=limits, trust_env=False)
            )
            for name, base in [*((target.name, "") for target in targets), ("stage", stage)]
        }
        return {kind.name: await measure_kind(kind, targets, clients, args) for kind in kinds}


async def measure_kind(
    kind: Kind, targets: list[Target], clients: dict[str, httpx.AsyncClient], args: argparse.Namespace
) -> dict[str, Samples]:
    body, stage = kind.body, clients["stage"]
    print(f"\n{kind.describe()}")
    for target in targets:  # warm-up, not counted
        client = clients[target.name]
        print(f"  {target.name:8} {await check(client, stage, target, body)}")
        await latency_batch(client, target.url, body, 5, Samples())
        await throughput_batch(client, target.url, body, 2 * CONCURRENCY, args.batch_timeout, Samples())
    samples = {target.name: Samples() for target in targets}
    for round_ in range(args.rounds):
        shift = round_ % len(targets)
        rotated = targets[shift:] + targets[:shift]
        for target in rotated:
            client, into = clients[target.name], samples[target.name]
            async with charged(target, args.latency_requests, stage, into):
                await latency_batch(client, target.url, body, args.latency_requests, into)
        for target in rotated:
            client, into = clients[target.name], samples[target.name]
            async with charged(target, args.throughput_requests, stage, into):
                await throughput_batch(client, target.url, body, args.throughput_requests, args.batch_timeout, into)
    return samples
