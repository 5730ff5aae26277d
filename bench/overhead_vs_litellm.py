"""Gateway overhead of the LiteLLM proxy and of our orchestrator over the same fake stage, side by side in one run.

    make bench-litellm        # creates .venv-litellm (LiteLLM's proxy, pinned) and runs this with the defaults
    .venv/bin/python bench/overhead_vs_litellm.py [--rounds 5] [--latency-requests 40] [--throughput-requests 320]
    .venv/bin/python bench/overhead_vs_litellm.py --rounds 2 --latency-requests 10 --throughput-requests 64  # quick

Three processes answer the same `POST /v1/chat/completions` body:

- direct: a fake OpenAI-compatible stage on loopback (`Stage`, below, in its own process), answering at once with a
  fixed short answer, streaming or not; the baseline every "added" latency is measured against;
- LiteLLM: `litellm --config … --num_workers 1` from its own virtualenv, one deployment of the stage as the model
  `vision-only` and a second deployment of the same stage as its fallback; no database, no master key, logging at
  ERROR, no telemetry, the bundled model cost map (nothing leaves loopback);
- ours: `python -m orchestrator serve` with the remote vision backend on the stage, no reasoning stage, the keyword
  router and no probes, called with `model: "vision-only"` (its vision-only path).

Each gateway is pinned to one core, the stage and this load generator (`httpx`) to the other. Every request kind
sends the same bytes to all three: `{"model": "vision-only", "messages": [{"role": "user", "content": [{"type":
"text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,…"}}]}]}`, no other
field. `tiny` carries a 1×1 PNG (our vision-only path needs an image; LiteLLM gets the same); `image` carries a PNG of
deterministic noise sized to about 1 MiB. LiteLLM passes the messages on to the stage, non-streaming. Ours reads the
request, decodes the base64, checks the PNG (signature, header, size limits, every chunk's length and CRC) and
hashes it (SHA-256), then sends the upload's bytes on to the stage, streaming, with its own
prompt (what the stage received from each is printed); it does not inflate the pixels, which nothing on this path
needs. After a warm-up, each round runs, for each target in an order that rotates between rounds, a batch of
sequential requests (concurrency 1: latency), then a batch at concurrency 32 (throughput).

It prints, per kind and target: p50/p99 latency and what each gateway adds over direct; median requests/s; the
target process's CPU time per request (the stage's for direct: less sensitive to other load than wall time); errors;
the ratios ours/LiteLLM and whether the targets are met. Last, the CPU time that other processes took during the
measurement: on a shared machine the numbers are only as clean as that is small.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is in this image?"
MODEL = "vision-only"
STAGE_ANSWER = "A small test image."
JSON_HEADERS = {"content-type": "application/json"}
CONCURRENCY = 32
IMAGE_BYTES = 1024 * 1024
STARTUP_TIMEOUT_S = 180.0
TARGETS = {"tiny": (5.0, 2.0), "image": (2.0, 2.0)}
"""Per kind: ours' added p50 latency must be at most 1/x of LiteLLM's; ours' throughput at least y times LiteLLM's."""


# The fake stage: one process, answers every chat completion at once


def _event(payload: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


class Stage:
    """The smallest OpenAI-compatible server that does the job, on asyncio streams (HTTP/1.1, keep-alive,
    `Content-Length` bodies): `POST /v1/chat/completions` answers `STAGE_ANSWER`, as one JSON completion or, when the
    body asks `"stream": true`, as an event stream (content, finish, usage, `[DONE]`); `GET /v1/models` lists `m`;
    `GET /bench/calls` counts the chat requests so far; `GET /bench/last` describes the last one. It parses no body:
    it looks for the stream flag in a body's first and last 4 KiB, where clients put it (the image sits in between),
    since parsing 1.4 MB of JSON would cost the core it shares with the load generator ~1-3 ms a request."""

    def __init__(self) -> None:
        head = {"id": "chatcmpl-bench", "created": 1764048000, "model": "m"}
        usage = {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}
        message = {"index": 0, "message": {"role": "assistant", "content": STAGE_ANSWER}, "finish_reason": "stop"}
        chunk = head | {"object": "chat.completion.chunk"}
        self.completion = json.dumps(
            head | {"object": "chat.completion", "choices": [message], "usage": usage}
        ).encode()
        self.stream = b"".join(
            [
                _event(chunk | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": STAGE_ANSWER}}]}),
                _event(chunk | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
                _event(chunk | {"choices": [], "usage": usage}),
                b"data: [DONE]\n\n",
            ]
        )
        self.models = json.dumps(
            {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "bench"}]}
        ).encode()
        self.last = b"{}"
        self.calls = 0

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, bytes, bytes]:
        if (method, path) == ("POST", "/v1/chat/completions"):
            self.last, self.calls = body, self.calls + 1
            if any(_streams(window) for window in (body[:4096], body[-4096:])):
                return 200, b"text/event-stream", self.stream
            return 200, b"application/json", self.completion
        if (method, path) == ("GET", "/v1/models"):
            return 200, b"application/json", self.models
        if (method, path) == ("GET", "/bench/calls"):
            return 200, b"application/json", str(self.calls).encode()
        if (method, path) == ("GET", "/bench/last"):
            return 200, b"application/json", json.dumps(describe_request(self.last)).encode()
        return 404, b"application/json", b'{"error": {"message": "not found"}}'

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            while True:
                lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {
                    name.strip().lower(): value.strip() for name, _, value in (x.partition(":") for x in lines[1:])
                }
                body = await reader.readexactly(int(headers.get("content-length") or 0))
                status, kind, payload = self.answer(method, path, body)
                head = f"HTTP/1.1 {status} -\r\ncontent-type: {kind.decode()}\r\ncontent-length: {len(payload)}\r\n\r\n"
                writer.write(head.encode() + payload)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        writer.close()


def _streams(window: bytes) -> bool:
    at = window.find(b'"stream"')
    return at >= 0 and window[at + 8 : at + 16].lstrip(b" :").startswith(b"true")


def describe_request(raw: bytes) -> dict[str, object]:
    """What a chat request carried: its size, its top-level fields, whether it streamed, its image's size."""
    body = json.loads(raw)
    parts = [
        part for message in body.get("messages", []) for part in message.get("content") or [] if isinstance(part, dict)
    ]
    urls = [str(part.get("image_url", {}).get("url", "")) for part in parts if part.get("type") == "image_url"]
    return {
        "bytes": len(raw),
        "fields": sorted(body),
        "stream": body.get("stream") is True,
        "image_url_chars": [len(u) for u in urls],
    }


async def serve_stage(port: int) -> None:
    stage = Stage()
    server = await asyncio.start_server(stage.connection, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


# What is sent


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
            f"body {len(self.body):,} bytes, the same to all three"
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


# Processes


@dataclass
class Gateway:
    name: str
    url: str
    health: str
    process: subprocess.Popen[bytes]
    log: Path
    startup_s: float = 0.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def spawn(
    name: str, argv: list[str], env: dict[str, str], core: int, logs: Path
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start `argv` pinned to `core` (the child inherits this process's affinity), in its own process group, its
    output in a log file."""
    log = logs / f"{name}.log"
    own = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
    finally:
        os.sched_setaffinity(0, own)
    return process, log


def wait_ready(name: str, process: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} while starting:\n{tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2.0, trust_env=False).status_code == 200:
                return time.monotonic() - started
        time.sleep(0.2)
    raise RuntimeError(f"{name} was not ready at {url} after {timeout_s:.0f} s:\n{tail(log)}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group, SIGKILL after 10 s."""
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(wait_s)


def tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def rss_mib(pid: int) -> float:
    """Resident memory of `pid` and its descendants (from /proc), in MiB."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
    return total / 1024


def base_env() -> dict[str, str]:
    """A clean environment: nothing of the caller's (API keys, DATABASE_URL, proxies) reaches a gateway."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}


LITELLM_OFFLINE = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
    "LITELLM_LOG": "ERROR",
    "LITELLM_MODE": "PRODUCTION",
    "HF_HUB_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
}
"""Bundled copies instead of GitHub downloads at startup, quiet logs, no `.env` loading, no hub."""


OURS_UNTHROTTLED = {
    "ORCH_CACHE__ENABLED": "false",
    "ORCH_RATE_LIMIT__REQUESTS_PER_S": "1000000",
    "ORCH_RATE_LIMIT__BURST": "1000000",
    "ORCH_RATE_LIMIT__MAX_CONCURRENT": "1000",
}
"""Like LiteLLM here: no answer cache (every request must reach the stage) and no per-client rate limit (all the
load comes from one address)."""


def litellm_config(stage_port: int) -> str:
    deployment = f"""
    litellm_params:
      model: openai/m
      api_base: http://127.0.0.1:{stage_port}/v1
      api_key: EMPTY"""
    return f"""model_list:
  - model_name: {MODEL}{deployment}
  - model_name: {MODEL}-fallback{deployment}
router_settings:
  fallbacks:
    - {MODEL}: [{MODEL}-fallback]
litellm_settings:
  telemetry: false
  request_timeout: 30
"""


def start_litellm(litellm: Path, stage_port: int, core: int, logs: Path) -> Gateway:
    config = logs / "litellm_config.yaml"
    config.write_text(litellm_config(stage_port))
    port = free_port()
    argv = [str(litellm), "--config", str(config), "--port", str(port), "--num_workers", "1", "--telemetry", "False"]
    process, log = spawn("litellm", argv, base_env() | LITELLM_OFFLINE, core, logs)
    url = f"http://127.0.0.1:{port}"
    return Gateway("litellm", f"{url}/v1/chat/completions", f"{url}/health/liveliness", process, log)


def start_ours(stage_port: int, core: int, logs: Path) -> Gateway:
    port = free_port()
    env = base_env() | {
        "ORCH_VISION__BACKEND": "remote",
        "ORCH_VISION__BASE_URL": f"http://127.0.0.1:{stage_port}/v1",
        "ORCH_VISION__MODEL": "m",
        "ORCH_REASONING__BACKEND": "none",
        "ORCH_ARBITRATION__PROBES": "off",
        "ORCH_ROUTER__KIND": "keyword",
        "ORCH_LOG_LEVEL": "warning",
        **OURS_UNTHROTTLED,
    }
    argv = [sys.executable, "-m", "orchestrator", "serve", "--host", "127.0.0.1", "--port", str(port)]
    process, log = spawn("ours", argv, env, core, logs)
    url = f"http://127.0.0.1:{port}"
    return Gateway("ours", f"{url}/v1/chat/completions", f"{url}/health", process, log)


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    pid: int
    """The process whose CPU time a request to `url` costs (the stage's, for direct)."""


@dataclass(frozen=True)
class Fleet:
    stage_url: str
    stage: subprocess.Popen[bytes]
    gateways: list[Gateway]

    @property
    def targets(self) -> list[Target]:
        direct = Target("direct", f"{self.stage_url}/v1/chat/completions", self.stage.pid)
        return [direct, *(Target(g.name, g.url, g.process.pid) for g in self.gateways)]

    @property
    def pids(self) -> list[int]:
        return [os.getpid(), self.stage.pid, *(gateway.process.pid for gateway in self.gateways)]


@contextlib.contextmanager
def fleet(args: argparse.Namespace, gateway_core: int, client_core: int, logs: Path) -> Iterator[Fleet]:
    """The stage on `client_core`, then each gateway on `gateway_core`, each waited for; this process stays on
    `client_core`. Every process started is stopped on the way out, whatever happens."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        stage_port = free_port()
        argv = [sys.executable, "-m", "bench.overhead_vs_litellm", "--stage", str(stage_port)]
        stage, stage_log = spawn("stage", argv, base_env(), client_core, logs)
        started.append(stage)
        stage_url = f"http://127.0.0.1:{stage_port}"
        wait_ready("stage", stage, f"{stage_url}/v1/models", stage_log, 60.0)
        os.sched_setaffinity(0, {client_core})
        gateways: list[Gateway] = []
        for name in args.gateways:
            if name == "litellm":
                gateway = start_litellm(args.litellm, stage_port, gateway_core, logs)
            else:
                gateway = start_ours(stage_port, gateway_core, logs)
            started.append(gateway.process)
            gateway.startup_s = wait_ready(name, gateway.process, gateway.health, gateway.log, STARTUP_TIMEOUT_S)
            gateways.append(gateway)
        yield Fleet(stage_url, stage, gateways)
    finally:
        for process in reversed(started):
            stop(process)


def process_ticks(pid: int) -> int:
    """CPU time (user + system, all threads) of `pid` so far, in clock ticks; 0 when it is gone."""
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    return 0


def cpu_ticks(pids: list[int]) -> tuple[int, int, int]:
    """Clock ticks so far: the machine's busy time (all cores), the hypervisor's steal, and `pids`' own CPU time."""
    machine = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = machine
    return user + nice + system + irq + softirq, steal, sum(process_ticks(pid) for pid in pids)


def print_noise(before: tuple[int, int, int], after: tuple[int, int, int], wall_s: float) -> None:
    """How much CPU other processes took while this measured: the numbers above are only as clean as this is low."""
    tick = os.sysconf("SC_CLK_TCK")
    busy, steal, ours = ((end - start) / tick for start, end in zip(before, after, strict=True))
    others = max(0.0, busy - ours)
    print(
        f"\nduring the {wall_s:.0f} s of measurement: this benchmark's processes used {ours:.1f} core-s, other "
        f"processes {others:.1f} core-s ({others / wall_s:.0%} of a core), hypervisor steal {steal:.1f} core-s"
    )
    if others / wall_s > 0.05:
        print("WARNING: other processes were busy during the measurement; its numbers are noisy (rerun when quiet)")


# Load


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


# Report


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs > 0 else float("nan")


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def added_ms(got: Samples, direct: Samples) -> tuple[float, float]:
    """p50 and p99 latency over direct's p50 and p99."""
    p50, p99 = (percentile(got.latencies_ms, q) - percentile(direct.latencies_ms, q) for q in (0.5, 0.99))
    return p50, p99


def report(kind: str, samples: dict[str, Samples]) -> None:
    direct = samples["direct"]
    print(f"\n{kind}: latency at concurrency 1 (ms), throughput at concurrency {CONCURRENCY} (median of rounds)")
    header = ("p50", "p99", "added p50", "added p99", "req/s", "CPU ms/req", "stage calls/req", "errors c1/c32")
    print(f"{'':14}" + "".join(f"{title:>16}" for title in header))
    for name, got in samples.items():
        added = ("", "") if name == "direct" else tuple(f"{ms:+.2f}" for ms in added_ms(got, direct))
        cells = [f"{percentile(got.latencies_ms, q):.2f}" for q in (0.5, 0.99)]
        calls = got.stage_calls / got.requests if got.requests else float("nan")
        cells += [*added, f"{median(got.rps):.1f}", f"{got.cpu_ms:.2f}", f"{calls:.2f}"]
        cells.append(f"{got.errors_c1}/{got.errors_c32}")
        print(f"{name:14}" + "".join(f"{cell:>16}" for cell in cells))
        if got.first_error:
            print(f"{'':14} first error: {got.first_error}")
    if "ours" in samples and "litellm" in samples:
        verdicts(kind, samples["ours"], samples["litellm"], direct)


def verdicts(kind: str, ours: Samples, theirs: Samples, direct: Samples) -> None:
    (ours_p50, ours_p99), (their_p50, their_p99) = added_ms(ours, direct), added_ms(theirs, direct)
    latency = ratio(ours_p50, their_p50)
    throughput = ratio(median(ours.rps), median(theirs.rps))
    cells = ["", "", f"{latency:.3f}", f"{ratio(ours_p99, their_p99):.3f}", f"{throughput:.2f}"]
    cells.append(f"{ratio(ours.cpu_ms, theirs.cpu_ms):.2f}")
    print(f"{'ours/litellm':14}" + "".join(f"{cell:>16}" for cell in cells))
    latency_target, throughput_target = TARGETS[kind]
    print(
        f"target: added p50 ≤ 1/{latency_target:g} of LiteLLM's (ratio ≤ {1 / latency_target:.2f}): "
        f"{verdict(latency <= 1 / latency_target)}; throughput ≥ {throughput_target:g}× LiteLLM's: "
        f"{verdict(throughput >= throughput_target)}"
    )


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# Main


def cores(args: argparse.Namespace) -> tuple[int, int]:
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2 and (args.gateway_core is None or args.client_core is None):
        raise SystemExit(f"needs two cores to pin on, has {available}")
    gateway = available[0] if args.gateway_core is None else int(args.gateway_core)
    client = available[1] if args.client_core is None else int(args.client_core)
    return gateway, client


def litellm_version(litellm: Path) -> str:
    code = "import importlib.metadata as m; print(m.version('litellm'))"
    argv = [str(litellm.parent / "python"), "-c", code]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout.strip()


def print_setup(args: argparse.Namespace, running: Fleet, gateway_core: int, client_core: int) -> None:
    print(f"gateways on core {gateway_core}; stage and load generator on core {client_core}")
    print(f"load average before: {' '.join(f'{load:.2f}' for load in os.getloadavg())}")
    if "litellm" in args.gateways:
        print(f"litellm {litellm_version(args.litellm)}")
    for gateway in running.gateways:
        resident = rss_mib(gateway.process.pid)
        print(f"{gateway.name}: ready {gateway.startup_s:.1f} s after start, {resident:.0f} MiB resident")
    print(
        f"{args.rounds} rounds × ({args.latency_requests} sequential + {args.throughput_requests} at concurrency "
        f"{CONCURRENCY}) per target and kind, after a warm-up; request timeout {args.timeout:g} s"
    )


def run(args: argparse.Namespace) -> None:
    gateway_core, client_core = cores(args)
    kinds = [Kind("tiny", png(1, 1), (1, 1)), noise_png(IMAGE_BYTES)]
    with (
        tempfile.TemporaryDirectory(prefix="bench-litellm-") as logs,
        fleet(args, gateway_core, client_core, Path(logs)) as running,
    ):
        print_setup(args, running, gateway_core, client_core)
        before, started = cpu_ticks(running.pids), time.monotonic()
        results = asyncio.run(measure(kinds, running.targets, running.stage_url, args))
        wall_s, after = time.monotonic() - started, cpu_ticks(running.pids)
        for kind, samples in results.items():
            report(kind, samples)
        print_noise(before, after, wall_s)
        for gateway in running.gateways:
            complaints = [line for line in tail(gateway.log, 10_000).splitlines() if "error" in line.lower()]
            first = f"; the first: {complaints[0][:200]}" if complaints else ""
            print(
                f"{gateway.name}: {rss_mib(gateway.process.pid):.0f} MiB resident after the run; "
                f"{len(complaints)} log lines mention an error{first}"
            )


def gateway_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = set(names) - {"litellm", "ours"}
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown gateways: {', '.join(sorted(unknown))}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latency-requests", type=int, default=40, help="sequential requests per target and round")
    parser.add_argument("--throughput-requests", type=int, default=320, help=f"requests at concurrency {CONCURRENCY}")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("--batch-timeout", type=float, default=120.0, help="seconds per throughput batch")
    parser.add_argument(
        "--gateways",
        type=gateway_list,
        default=["litellm", "ours"],
        help="comma-separated: litellm, ours (default both)",
    )
    parser.add_argument("--litellm", type=Path, default=ROOT / ".venv-litellm" / "bin" / "litellm")
    parser.add_argument("--gateway-core", type=int)
    parser.add_argument("--client-core", type=int)
    parser.add_argument("--stage", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage is not None:
        asyncio.run(serve_stage(args.stage))
        return
    if "litellm" in args.gateways and not args.litellm.exists():
        raise SystemExit(f"{args.litellm} is missing: `make bench-litellm` creates .venv-litellm")
    try:
        run(args)
    except RuntimeError as exc:  # a process that would not start, a gateway that answered wrong
        raise SystemExit(f"benchmark stopped: {exc}") from exc


if __name__ == "__main__":
    main()
