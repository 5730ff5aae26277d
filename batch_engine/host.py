"""The host's pace: how long the host takes to launch one small operation on the engine's device (measured as the
engine is built, on the thread that builds it), and the choice it informs, whether prefills replay as CUDA graphs
(`EngineSettings.prefill_graphs`).

An eager prefill runs forty decoder layers' Python and launches their kernels one by one, so a host that launches
slowly makes it slower by as much; a prefill replayed as a CUDA graph is one launch. On an H100 whose host launched a
one-element add in 5.9–6.0 µs the graphs cost about 1 ms of a 67 ms first token; on one whose host took 10.4–12.8 µs
they took it from 122.2 to 77.5 ms, and on an H200 whose host took 7.6–11.9 µs from 73.5 to 64.6 (p50s;
`bench/gpu_prefill_graphs.py`, `bench/RESULTS.md`)."""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

log = logging.getLogger("batch_engine")

SLOW_LAUNCH_US = 6.5
"""A host that takes at least this long to launch a one-element add (`launch_pace`) is slow: `auto` replays prefills
as CUDA graphs there. Between the 5.9–6.0 µs of the one host measured that kept up with the device (an H100's) and the
readings of 7.6–12.8 µs of the five measured that did not (four H100s', an H200's), whose prefills the graphs sped up,
and nearer the first: a wrong `on` cost a first token about 1 ms there, a wrong `off` cost 9–45 ms on the slow hosts.
(It was 8.0 until two readings fell below that, the H200 host's 7.6 and an H100 host's 8.1.)"""


def launch_pace(device: Any, *, launches: int = 2000, rounds: int = 5) -> float:
    """The host's cost of launching one small operation on `device`, in microseconds (p50 of `rounds`, each
    `launches` one-element adds queued back to back, the device idle at the start): what an eager prefill pays on its
    host for each of its kernels, where a CUDA graph pays it once. On the CPU, what one such add costs there."""
    import torch

    cuda = torch.device(device).type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    one, out = torch.zeros(1, device=device), torch.empty(1, device=device)
    paces: list[float] = []
    for _ in range(rounds):
        sync()
        started = time.perf_counter()
        for _ in range(launches):
            torch.add(one, 1, out=out)
        paces.append((time.perf_counter() - started) / launches * 1e6)
        sync()
    return statistics.median(paces)


def prefill_graphs(setting: bool | None, device: Any, *, cuda_graphs: bool, named: str) -> bool:
    """Whether prefills are padded to their length bucket and replayed as CUDA graphs: `setting` where it is given
    (True or False), else (`auto`, None) where the engine captures graphs on a CUDA device and its host is slow
    (`SLOW_LAUNCH_US`). On a CUDA device with graphs the host's pace is measured and logged, with a warning where it
    is slow and the setting keeps the graphs off, naming the setting (`named`)."""
    import torch

    if not (cuda_graphs and torch.device(device).type == "cuda"):
        return bool(setting)
    pace = launch_pace(device)
    slow = pace >= SLOW_LAUNCH_US
    chosen = slow if setting is None else setting
    log.info(
        "batching engine: the host launches a one-element add in %.1f µs (slow from %.1f); prefills as CUDA graphs %s",
        pace, SLOW_LAUNCH_US, "on" if chosen else "off",
    )  # fmt: skip
    if slow and not chosen:
        log.warning(
            "batching engine: the host launches slowly (%.1f µs a one-element add), so each eager prefill waits on it; "
            "prefills replayed as CUDA graphs (%s on or auto) took a first token from 122.2 to 77.5 ms on such a host",
            pace, named,
        )  # fmt: skip
    return chosen
