"""Gateway overhead of the LiteLLM proxy and of our orchestrator over the same fake stage, side by side in one run.

    make bench-litellm        # creates .venv-litellm (LiteLLM's proxy, pinned); runs this with both transports and bare
    .venv/bin/python -m bench.overhead_vs_litellm [--rounds 5] [--latency-requests 40] [--throughput-requests 320]
        [--transport aiohttp,httpx] [--gateways litellm,ours,bare]
    .venv/bin/python -m bench.overhead_vs_litellm --rounds 2 --latency-requests 10 --throughput-requests 64  # quick

These processes answer the same `POST /v1/chat/completions` body:

- direct: a fake OpenAI-compatible stage on loopback (`bench.fake_stage`, in its own process), answering at once with a
  fixed short answer, streaming or not; the baseline every "added" latency is measured against;
- LiteLLM: `litellm --config … --num_workers 1` from its own virtualenv, one deployment of the stage as the model
  `vision-only` and a second deployment of the same stage as its fallback; no database, no master key, logging at
  ERROR, no telemetry, the bundled model cost map (nothing leaves loopback);
- bare (`--gateways bare`): `bench.bare_gateway`, the smallest gateway on our server and client stack, passing the
  body on unread (no validation, streaming or middleware): the floor one more HTTP hop costs here;
- ours, once per HTTP client named by `--transport` (`ours-aiohttp`, `ours-httpx`: `ORCH_VISION__TRANSPORT`):
  `python -m orchestrator serve` with the remote vision backend on the stage, no reasoning stage, the keyword router
  and no probes, called with `model: "vision-only"` (its vision-only path).

Each gateway is pinned to one core, the stage and this load generator (`httpx`) to the other. Every request kind
sends the same bytes to every target: `{"model": "vision-only", "messages": [{"role": "user", "content": [{"type":
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
the ratios ours/LiteLLM and whether the targets are met, for each transport. Last, the CPU time that other processes
took during the measurement: on a shared machine the numbers are only as clean as that is small.
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
from dataclasses import dataclass
from pathlib import Path

from bench import fake_stage
from bench.gateway_load import CONCURRENCY, MODEL, Kind, Samples, Target, measure, noise_png, png
from bench.processes import (
    ROOT,
    base_env,
    cores,
    cpu_ticks,
    free_port,
    print_noise,
    rss_mib,
    spawn,
    stop,
    tail,
    wait_ready,
)

IMAGE_BYTES = 1024 * 1024
STARTUP_TIMEOUT_S = 180.0
TARGETS = {"tiny": (5.0, 2.0), "image": (2.0, 2.0)}
"""Per kind: ours' added p50 latency must be at most 1/x of LiteLLM's; ours' throughput at least y times LiteLLM's."""
TRANSPORTS = ("aiohttp", "httpx")


# What is sent


# Processes


@dataclass
class Gateway:
    name: str
    url: str
    health: str
    process: subprocess.Popen[bytes]
    log: Path
    startup_s: float = 0.0


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


def ours_env(stage_port: int) -> dict[str, str]:
    """Our orchestrator's environment: the remote vision backend on the stage, its vision-only path, unthrottled."""
    return base_env() | {
        "ORCH_VISION__BACKEND": "remote",
        "ORCH_VISION__BASE_URL": f"http://127.0.0.1:{stage_port}/v1",
        "ORCH_VISION__MODEL": "m",
        "ORCH_REASONING__BACKEND": "none",
        "ORCH_ARBITRATION__PROBES": "off",
        "ORCH_ROUTER__KIND": "keyword",
        "ORCH_LOG_LEVEL": "warning",
        **OURS_UNTHROTTLED,
    }


def start_bare(stage_port: int, core: int, logs: Path) -> Gateway:
    port = free_port()
    argv = [sys.executable, "-m", "bench.bare_gateway", str(port), f"http://127.0.0.1:{stage_port}"]
    process, log = spawn("bare", argv, base_env(), core, logs)
    url = f"http://127.0.0.1:{port}"
    return Gateway("bare", f"{url}/v1/chat/completions", f"{url}/health", process, log)


def start_ours(transport: str, stage_port: int, core: int, logs: Path) -> Gateway:
    port = free_port()
    name = f"ours-{transport}"
    env = ours_env(stage_port) | {"ORCH_VISION__TRANSPORT": transport}
    argv = [sys.executable, "-m", "orchestrator", "serve", "--host", "127.0.0.1", "--port", str(port)]
    process, log = spawn(name, argv, env, core, logs)
    url = f"http://127.0.0.1:{port}"
    return Gateway(name, f"{url}/v1/chat/completions", f"{url}/health", process, log)


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
        stage, stage_port = fake_stage.start(client_core, logs)
        started.append(stage)
        stage_url = f"http://127.0.0.1:{stage_port}"
        os.sched_setaffinity(0, {client_core})
        gateways: list[Gateway] = []
        for name in args.gateways:  # one at a time, so that each startup time is its own
            for transport in args.transport if name == "ours" else [None]:
                if transport is not None:
                    gateway = start_ours(transport, stage_port, gateway_core, logs)
                elif name == "bare":
                    gateway = start_bare(stage_port, gateway_core, logs)
                else:
                    gateway = start_litellm(args.litellm, stage_port, gateway_core, logs)
                started.append(gateway.process)
                health, log = gateway.health, gateway.log
                gateway.startup_s = wait_ready(gateway.name, gateway.process, health, log, STARTUP_TIMEOUT_S)
                gateways.append(gateway)
        yield Fleet(stage_url, stage, gateways)
    finally:
        for process in reversed(started):
            stop(process)


# Load


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
    ours = [name for name in samples if name.startswith("ours-")]
    if "litellm" in samples:
        for name in ours:
            verdicts(kind, name, samples[name], samples["litellm"], direct)
    if "bare" in samples:
        hop = added_ms(samples["bare"], direct)[0]
        beyond = [
            f"{name.removeprefix('ours-')} {added_ms(samples[name], direct)[0] - hop:+.2f}"
            for name in (*ours, "litellm")
            if name in samples
        ]
        print(f"{'':14}added p50 beyond the bare hop's {hop:+.2f} ms: {', '.join(beyond)}")


def verdicts(kind: str, name: str, ours: Samples, theirs: Samples, direct: Samples) -> None:
    (ours_p50, ours_p99), (their_p50, their_p99) = added_ms(ours, direct), added_ms(theirs, direct)
    latency = ratio(ours_p50, their_p50)
    throughput = ratio(median(ours.rps), median(theirs.rps))
    cells = ["", "", f"{latency:.3f}", f"{ratio(ours_p99, their_p99):.3f}", f"{throughput:.2f}"]
    cells.append(f"{ratio(ours.cpu_ms, theirs.cpu_ms):.2f}")
    print(f"{name.removeprefix('ours-') + '/litellm':14}" + "".join(f"{cell:>16}" for cell in cells))
    latency_target, throughput_target = TARGETS[kind]
    print(
        f"{'':14}target: added p50 ≤ 1/{latency_target:g} of LiteLLM's (ratio ≤ {1 / latency_target:.2f}): "
        f"{verdict(latency <= 1 / latency_target)}; throughput ≥ {throughput_target:g}× LiteLLM's: "
        f"{verdict(throughput >= throughput_target)}"
    )


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# Main


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
    unknown = set(names) - {"litellm", "ours", "bare"}
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown gateways: {', '.join(sorted(unknown))}")
    return names


def transport_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = set(names) - set(TRANSPORTS)
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown transports: {', '.join(sorted(unknown)) or 'none given'}")
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
        help="comma-separated: litellm, ours, bare (the hop alone, `bench.bare_gateway`); default litellm,ours",
    )
    parser.add_argument(
        "--transport",
        type=transport_list,
        default=["aiohttp"],
        help="comma-separated HTTP clients of ours to run side by side: aiohttp, httpx (default aiohttp)",
    )
    parser.add_argument("--litellm", type=Path, default=ROOT / ".venv-litellm" / "bin" / "litellm")
    parser.add_argument("--gateway-core", type=int)
    parser.add_argument("--client-core", type=int)
    args = parser.parse_args()
    if "litellm" in args.gateways and not args.litellm.exists():
        raise SystemExit(f"{args.litellm} is missing: `make bench-litellm` creates .venv-litellm")
    try:
        run(args)
    except RuntimeError as exc:  # a process that would not start, a gateway that answered wrong
        raise SystemExit(f"benchmark stopped: {exc}") from exc


if __name__ == "__main__":
    main()
