"""The gateway's added latency and CPU per request, this checkout against another commit, side by side in one run.

    .venv/bin/python -m bench.ab_commits --base HEAD~1 [--rounds 10] [--requests 200] [--kind tiny|image]

A change to the request path moves the tiny request by tens of microseconds, less than two runs of
`bench.overhead_vs_litellm` differ by; this compares two versions of the code in the same minutes instead. It checks
`--base` out into a temporary git worktree, starts the orchestrator from there ("base") and from this checkout
("this") on one core, in front of one fake stage (`bench.fake_stage`, configured as in the gateway benchmark),
and sends the same request sequentially to the stage directly and to both, in batches whose order alternates between
rounds. It prints each one's added p50 over direct, its CPU time per request and its resident memory at the end.
The worktree is removed at the end.
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
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from bench import fake_stage
from bench.gateway_load import JSON_HEADERS, Kind, noise_png, png
from bench.overhead_vs_litellm import IMAGE_BYTES, ours_env
from bench.processes import ROOT, cores, free_port, process_ticks, resident_mib, spawn, stop, wait_ready


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as parent:
        path = Path(parent) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(path), rev], cwd=ROOT, check=True)
        try:
            yield path
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, check=False)


def start(name: str, cwd: Path, stage_port: int, core: int, logs: Path) -> tuple[subprocess.Popen[bytes], str]:
    """The orchestrator of the checkout at `cwd`, with the gateway benchmark's settings (no transport named: a commit
    from before that setting would refuse it)."""
    port = free_port()
    argv = [sys.executable, "-m", "orchestrator", "serve", "--host", "127.0.0.1", "--port", str(port)]
    process, log = spawn(name, argv, ours_env(stage_port), core, logs, cwd=cwd)
    wait_ready(name, process, f"http://127.0.0.1:{port}/health", log, 180.0)
    return process, f"http://127.0.0.1:{port}/v1/chat/completions"


async def measure(urls: dict[str, str], pids: dict[str, int], body: bytes, args: argparse.Namespace) -> None:
    latencies: dict[str, list[float]] = {name: [] for name in urls}
    ticks = dict.fromkeys(pids, 0)
    async with httpx.AsyncClient(trust_env=False, timeout=30.0) as client:
        for url in urls.values():  # warm-up
            for _ in range(50):
                (await client.post(url, content=body, headers=JSON_HEADERS)).raise_for_status()
        for round_ in range(args.rounds):
            order = list(urls.items())
            for name, url in order[::-1] if round_ % 2 else order:
                before = process_ticks(pids[name]) if name in pids else 0
                for _ in range(args.requests):
                    started = time.perf_counter()
                    (await client.post(url, content=body, headers=JSON_HEADERS)).raise_for_status()
                    latencies[name].append((time.perf_counter() - started) * 1000.0)
                if name in pids:
                    ticks[name] += process_ticks(pids[name]) - before
    direct = statistics.median(latencies["direct"])
    requests = args.rounds * args.requests
    print(f"{args.rounds} rounds × {args.requests} sequential requests per target; direct p50 {direct:.3f} ms")
    for name in pids:
        cpu_ms = 1000.0 * ticks[name] / os.sysconf("SC_CLK_TCK") / requests
        added = statistics.median(latencies[name]) - direct
        print(f"{name:5} ({args.base if name == 'base' else 'this checkout'}): added p50 {added:.3f} ms, "
              f"CPU {cpu_ms:.3f} ms/request, resident {resident_mib(pids[name]):.0f} MiB at the end")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the commit to compare this checkout with")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=200, help="sequential requests per target and round")
    parser.add_argument("--kind", choices=["tiny", "image"], default="tiny")
    parser.add_argument("--gateway-core", type=int)
    parser.add_argument("--client-core", type=int)
    args = parser.parse_args()
    gateway_core, client_core = cores(args)
    kind = Kind("tiny", png(1, 1), (1, 1)) if args.kind == "tiny" else noise_png(IMAGE_BYTES)
    started: list[subprocess.Popen[bytes]] = []
    with worktree(args.base) as base, tempfile.TemporaryDirectory(prefix="bench-ab-logs-") as logs:
        try:
            stage, stage_port = fake_stage.start(client_core, Path(logs))
            started.append(stage)
            urls = {"direct": f"http://127.0.0.1:{stage_port}/v1/chat/completions"}
            pids: dict[str, int] = {}
            for name, cwd in (("base", base), ("this", ROOT)):
                process, urls[name] = start(name, cwd, stage_port, gateway_core, Path(logs))
                started.append(process)
                pids[name] = process.pid
            os.sched_setaffinity(0, {client_core})
            asyncio.run(measure(urls, pids, kind.body, args))
        finally:
            for process in reversed(started):
                stop(process)


if __name__ == "__main__":
    main()
