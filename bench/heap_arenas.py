"""How many glibc arenas the service's heap should use: memory kept and throughput under concurrent image requests,
one service per arena limit, side by side in one run.

    .venv/bin/python -m bench.heap_arenas [--rounds 3] [--requests 320] [--arenas 1,2,4,glibc]

The service keeps megabyte buffers in glibc's heap (`stage_protocol.server.command.keep_large_buffers_in_heap`),
and each arena keeps its own free top of up to 64 MiB: the memory kept grows with the arenas, and glibc gives threads
up to 8 arenas a core. This starts the fake stage of the gateway benchmark (`bench.fake_stage`) and one orchestrator
per arena limit, as the gateway benchmark configures it (its vision-only path on the remote backend, cache and rate
limits off), each limit set through glibc's own `MALLOC_ARENA_MAX`, which the service leaves alone when it is set
(`glibc`: 8 × this machine's cores, glibc's default; unset: the shipped limit, `HEAP_ARENAS`). The services share one
core, the stage and this load generator the other. For a 1 MB and a 4 MB PNG in turn, each round sends every service
a batch at concurrency 32 and then 40 sequential requests, in an order that rotates between rounds; it prints each
service's median requests/s, its p50 latency at concurrency 1, and its resident memory after each image size.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.gateway_load import CONCURRENCY, Samples, latency_batch, noise_png, throughput_batch
from bench.overhead_vs_litellm import IMAGE_BYTES, ours_env
from bench.processes import base_env, cores, free_port, resident_mib, spawn, stop, wait_ready
from stage_protocol.server.command import HEAP_ARENAS


@dataclass
class Service:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    samples: dict[str, Samples] = field(default_factory=dict)
    resident: dict[str, float] = field(default_factory=dict)


def arena_env(limit: str) -> dict[str, str]:
    if limit == "shipped":
        return {}
    count = 8 * (os.cpu_count() or 1) if limit == "glibc" else int(limit)
    return {"MALLOC_ARENA_MAX": str(count)}


@contextlib.contextmanager
def services(limits: list[str], gateway_core: int, client_core: int, logs: Path) -> Iterator[list[Service]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        stage_port = free_port()
        stage, stage_log = spawn(
            "stage", [sys.executable, "-m", "bench.fake_stage", str(stage_port)], base_env(), client_core, logs
        )
        started.append(stage)
        wait_ready("stage", stage, f"http://127.0.0.1:{stage_port}/v1/models", stage_log, 60.0)
        os.sched_setaffinity(0, {client_core})
        running = []
        for limit in limits:
            port = free_port()
            argv = [sys.executable, "-m", "orchestrator", "serve", "--host", "127.0.0.1", "--port", str(port)]
            name = f"arenas {limit}" if limit != "shipped" else f"arenas {HEAP_ARENAS} (shipped)"
            process, log = spawn(
                name.replace(" ", "-"), argv, ours_env(stage_port) | arena_env(limit), gateway_core, logs
            )
            started.append(process)
            wait_ready(name, process, f"http://127.0.0.1:{port}/health", log, 180.0)
            running.append(Service(name, f"http://127.0.0.1:{port}/v1/chat/completions", process))
        yield running
    finally:
        for process in reversed(started):
            stop(process)


async def measure(running: list[Service], args: argparse.Namespace) -> None:
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=60.0, limits=limits, trust_env=False) as client:
        for megabytes in (1, 4):
            body = noise_png(megabytes * IMAGE_BYTES).body
            kind = f"{megabytes} MB"
            for service in running:
                service.samples[kind] = Samples()
                await latency_batch(client, service.url, body, 5, Samples())  # warm-up
            for round_ in range(args.rounds):
                shift = round_ % len(running)
                for service in running[shift:] + running[:shift]:
                    into = service.samples[kind]
                    await throughput_batch(client, service.url, body, args.requests, 300.0, into)
                    await latency_batch(client, service.url, body, 40, into)
            for service in running:
                service.resident[kind] = resident_mib(service.process.pid)


def report(running: list[Service]) -> None:
    print(f"\n{'':24}{'req/s at 32':>14}{'p50 ms at 1':>14}{'resident MiB':>14}{'errors':>8}")
    for kind in running[0].samples:
        print(kind)
        for service in running:
            got = service.samples[kind]
            p50 = statistics.median(got.latencies_ms) if got.latencies_ms else float("nan")
            cells = [f"{statistics.median(got.rps):.1f}", f"{p50:.2f}", f"{service.resident[kind]:.0f}"]
            cells.append(f"{got.errors_c1 + got.errors_c32}")
            print(f"  {service.name:22}" + "".join(f"{cell:>14}" for cell in cells[:3]) + f"{cells[3]:>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=320, help=f"requests per batch at concurrency {CONCURRENCY}")
    parser.add_argument(
        "--arenas",
        default="1,shipped,4,glibc",
        help="comma-separated limits: numbers, `shipped` (no MALLOC_ARENA_MAX) and `glibc` (8 × cores)",
    )
    parser.add_argument("--gateway-core", type=int)
    parser.add_argument("--client-core", type=int)
    args = parser.parse_args()
    gateway_core, client_core = cores(args)
    limits = [limit.strip() for limit in args.arenas.split(",") if limit.strip()]
    print(f"services on core {gateway_core}; stage and load generator on core {client_core}; {os.cpu_count()} cores")
    with (
        tempfile.TemporaryDirectory(prefix="bench-arenas-") as logs,
        services(limits, gateway_core, client_core, Path(logs)) as running,
    ):
        asyncio.run(measure(running, args))
        report(running)


if __name__ == "__main__":
    main()
