"""Child processes of the benchmarks: started pinned to a core with their output in a log, waited for, stopped;
their CPU time and resident memory, and how busy the rest of the machine was meanwhile."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def spawn(
    name: str, argv: list[str], env: dict[str, str], core: int, logs: Path, *, cwd: Path = ROOT
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start `argv` pinned to `core` (the child inherits this process's affinity), in its own process group, its
    output in a log file."""
    log = logs / f"{name}.log"
    own = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
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


def resident_mib(pid: int) -> float:
    """`pid`'s resident memory now (VmRSS), in MiB; 0 when it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def rss_mib(pid: int) -> float:
    """Resident memory of `pid` and its descendants (from /proc), in MiB."""
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        total += resident_mib(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
    return total


def base_env() -> dict[str, str]:
    """A clean environment: nothing of the caller's (API keys, DATABASE_URL, proxies) reaches a gateway."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}


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


def cores(args: argparse.Namespace) -> tuple[int, int]:
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2 and (args.gateway_core is None or args.client_core is None):
        raise SystemExit(f"needs two cores to pin on, has {available}")
    gateway = available[0] if args.gateway_core is None else int(args.gateway_core)
    client = available[1] if args.client_core is None else int(args.client_core)
    return gateway, client


@dataclass(frozen=True)
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: IO[bytes]
    url: str

    def log_tail(self, lines: int = 20) -> str:
        self.log.seek(0)
        return "\n".join(self.log.read().decode(errors="replace").splitlines()[-lines:])


@contextmanager
def child_process(name: str, args: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[Child]:
    """`python ARGS` in the repository root, its output kept in a temporary file, until the block ends."""
    with tempfile.TemporaryFile(prefix=f"load-{name}-") as log:
        process = subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            yield Child(name, process, log, f"http://127.0.0.1:{port}")
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far; 0 where /proc does not say."""
    return process_ticks(pid) / os.sysconf("SC_CLK_TCK")


def peak_kib(pid: int) -> int | None:
    """The process's peak resident set (VmHWM), in KiB; None where /proc does not say."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None
