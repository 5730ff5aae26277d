"""What the service's heap setting buys and costs, against glibc's own behaviour and other thresholds, side by side
in one run.

    .venv/bin/python -m bench.heap_settings [--rounds 5] [--variants shipped,glibc,16:32]

The service keeps megabyte buffers in glibc's heap (`stage_protocol.server.command.keep_large_buffers_in_heap`:
`M_MMAP_THRESHOLD` and `M_TRIM_THRESHOLD` at 64 MiB). This starts the fake stage of the gateway benchmark
(`bench.fake_stage`) and one orchestrator per variant, as the gateway benchmark configures it (its vision-only path
on the remote backend, cache and rate limits off):

- `shipped`: the service as it runs;
- `glibc`: the service without the setting (`python -m bench.heap_settings untuned ...` runs the orchestrator with
  `keep_large_buffers_in_heap` switched off): glibc's own thresholds, which adapt to the buffers freed;
- `M:T`: the thresholds at M and T MiB through glibc's own `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_`,
  which the service then leaves alone.

The services share one core, the stage and this load generator the other. First, in fresh processes, rounds of 100
sequential requests with a 1 MB PNG (p50 latency, the service's CPU per request); then rounds of 160 requests with a
4 MB PNG at concurrency 32 (requests/s, and the service's resident memory after each round), in an order that rotates
between rounds.
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

from bench import fake_stage
from bench.gateway_load import CONCURRENCY, Samples, latency_batch, noise_png, throughput_batch
from bench.overhead_vs_litellm import IMAGE_BYTES, ours_env
from bench.processes import cores, free_port, process_ticks, resident_mib, spawn, stop, wait_ready

MIB = 1 << 20


@dataclass
class Service:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    latency_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    resident: list[float] = field(default_factory=list)
    errors: int = 0


def variant_list(text: str) -> list[str]:
    """`--variants`: comma-separated `shipped`, `glibc` or `M:T` (MiB, whole numbers)."""
    variants = [variant.strip() for variant in text.split(",") if variant.strip()]
    for variant in variants:
        mmap, _, trim = variant.partition(":")
        if variant not in ("shipped", "glibc") and not (mmap.isdigit() and trim.isdigit()):
            raise argparse.ArgumentTypeError(f"{variant!r} is not shipped, glibc or M:T in MiB (e.g. 16:32)")
    if not variants:
        raise argparse.ArgumentTypeError("no variant given")
    return variants


def command(variant: str) -> tuple[list[str], dict[str, str]]:
    """The orchestrator's command line (less `serve` and its options) and extra environment of `variant`."""
    if variant == "shipped":
        return [sys.executable, "-m", "orchestrator"], {}
    if variant == "glibc":
        return [sys.executable, "-m", "bench.heap_settings", "untuned"], {}
    mmap, trim = (int(mib) * MIB for mib in variant.split(":"))
    return [sys.executable, "-m", "orchestrator"], {
        "MALLOC_MMAP_THRESHOLD_": str(mmap),
        "MALLOC_TRIM_THRESHOLD_": str(trim),
    }


@contextlib.contextmanager
def services(variants: list[str], gateway_core: int, client_core: int, logs: Path) -> Iterator[list[Service]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        stage, stage_port = fake_stage.start(client_core, logs)
        started.append(stage)
        os.sched_setaffinity(0, {client_core})
        running = []
        for number, variant in enumerate(variants):
            port = free_port()
            base, extra = command(variant)
            argv = [*base, "serve", "--host", "127.0.0.1", "--port", str(port)]
            process, log = spawn(f"service-{number}", argv, ours_env(stage_port) | extra, gateway_core, logs)
            started.append(process)
            wait_ready(variant, process, f"http://127.0.0.1:{port}/health", log, 180.0)
            running.append(Service(variant, f"http://127.0.0.1:{port}/v1/chat/completions", process))
        yield running
    finally:
        for process in reversed(started):
            stop(process)


def rotated(running: list[Service], round_: int) -> list[Service]:
    shift = round_ % len(running)
    return running[shift:] + running[:shift]


async def measure(running: list[Service], rounds: int) -> None:
    one, four = noise_png(IMAGE_BYTES).body, noise_png(4 * IMAGE_BYTES).body
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    async with httpx.AsyncClient(timeout=60.0, limits=limits, trust_env=False) as client:
        for service in running:
            await latency_batch(client, service.url, one, 10, Samples())  # warm-up
        for round_ in range(rounds):
            for service in rotated(running, round_):
                ticks, got = process_ticks(service.process.pid), Samples()
                await latency_batch(client, service.url, one, 100, got)
                service.cpu_ms.append((process_ticks(service.process.pid) - ticks) * tick_ms / 100)
                service.latency_ms.append(statistics.median(got.latencies_ms) if got.latencies_ms else float("nan"))
                service.errors += got.errors_c1
        for round_ in range(rounds):
            for service in rotated(running, round_):
                got = Samples()
                await throughput_batch(client, service.url, four, 160, 300.0, got)
                service.rps.append(got.rps[0])
                service.resident.append(resident_mib(service.process.pid))
                service.errors += got.errors_c32


def report(running: list[Service]) -> None:
    print(
        f"\n{'':10}{'1 MB at 1: p50 ms':>20}{'CPU ms/req':>12}{'4 MB at 32: req/s':>20}"
        f"{'resident MiB after each round':>34}{'errors':>8}"
    )
    for service in running:
        resident = " ".join(f"{mib:.0f}" for mib in service.resident)
        print(
            f"{service.name:10}{statistics.median(service.latency_ms):>20.2f}{statistics.median(service.cpu_ms):>12.2f}"
            f"{statistics.median(service.rps):>20.1f}{resident:>34}{service.errors:>8}"
        )


def untuned() -> None:
    """The orchestrator's own command line (`sys.argv[2:]`) without the heap setting."""
    import runpy

    import stage_protocol.server.command as server_command

    server_command.keep_large_buffers_in_heap = lambda: False
    sys.argv = ["orchestrator", *sys.argv[2:]]
    runpy.run_module("orchestrator", run_name="__main__")


def main() -> None:
    if sys.argv[1:2] == ["untuned"]:
        untuned()
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--variants",
        type=variant_list,
        default="shipped,glibc,16:32",
        help="comma-separated: shipped, glibc, M:T (MiB); default shipped,glibc,16:32",
    )
    parser.add_argument("--gateway-core", type=int)
    parser.add_argument("--client-core", type=int)
    args = parser.parse_args()
    variants: list[str] = args.variants
    gateway_core, client_core = cores(args)
    print(f"services on core {gateway_core}; stage and load generator on core {client_core}")
    with (
        tempfile.TemporaryDirectory(prefix="bench-heap-") as logs,
        services(variants, gateway_core, client_core, Path(logs)) as running,
    ):
        asyncio.run(measure(running, args.rounds))
        report(running)


if __name__ == "__main__":
    main()
