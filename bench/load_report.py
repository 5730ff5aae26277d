"""The load benchmark's records (`bench.load`) and the tables it prints from them."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from tests.faulty_server import Mode

Kind = Literal["vision", "reasoning"]


@dataclass(frozen=True)
class Sample:
    kind: Kind
    status: str
    """The HTTP status, or the exception's class name when no response came."""
    seconds: float
    degraded: bool = False
    failures: tuple[str, ...] = ()
    """The error types of the stages that failed without failing the request (the response's `failures`)."""


@dataclass(frozen=True)
class Phase:
    samples: list[Sample]
    seconds: float
    cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds each process spent during the phase."""

    def throughput(self) -> float:
        return len(self.samples) / self.seconds if self.seconds else 0.0

    def latency_ms(self, q: float) -> float:
        ordered = sorted(sample.seconds for sample in self.samples)
        return 1000 * ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


@dataclass(frozen=True)
class Options:
    requests: int
    direct_requests: int
    concurrency: int
    seed: int
    phase_limit_s: float


@dataclass(frozen=True)
class Measured:
    direct: Phase
    service: Phase
    peak_kib: int | None
    reasoning_served: dict[str, int]


def report_replicas(one: Phase, two: Phase, options: Options) -> list[str]:
    print("\n## two replicas sharing one Redis (`ORCH_STATE__URL`), reasoning fake `ok`")
    print(
        f"{options.requests} requests to one replica, then as many to two in turn; concurrency {options.concurrency}\n"
    )
    print("| measure | one replica | two replicas | two − one | ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    _row("throughput, requests/s", one.throughput(), two.throughput(), difference=False)
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        _row(f"latency {label}, ms", one.latency_ms(q), two.latency_ms(q))
    for name, phase in (("one replica", one), ("two replicas", two)):
        spent = ", ".join(f"{process} {seconds:.1f}" for process, seconds in phase.cpu_s.items())
        print(f"CPU seconds, {name} ({phase.seconds:.1f} s of wall time): {spent}")
    problems = []
    for name, phase in (("one replica", one), ("two replicas", two)):
        statuses = Counter(sample.status for sample in phase.samples)
        if statuses["200"] != options.requests:
            problems.append(f"{name}: {options.requests - statuses['200']} requests got no 200: {dict(statuses)}")
    return problems


def report(scenario: str, reasoning_mode: Mode, measured: Measured, options: Options) -> list[str]:
    """Print the scenario's figures; the problems found (lost or failed requests), empty when none."""
    direct, service = measured.direct, measured.service
    kinds = Counter(sample.kind for sample in service.samples)
    print(f"\n## {scenario}: reasoning fake `{reasoning_mode}`")
    print(f"{options.requests} requests through the orchestrator ({kinds['vision']} vision, {kinds['reasoning']} "
          f"reasoning), {len(direct.samples)} direct; concurrency {options.concurrency}\n")  # fmt: skip
    print("| measure | direct to the fakes | through the orchestrator | orchestrator − direct | ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    _row("throughput, requests/s", direct.throughput(), service.throughput(), difference=False)
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        _row(f"latency {label}, ms", direct.latency_ms(q), service.latency_ms(q))
    for kind in ("vision", "reasoning"):
        for q, label in ((0.5, "p50"), (0.99, "p99")):
            _row(f"{kind} route {label}, ms", _kind(direct, kind).latency_ms(q), _kind(service, kind).latency_ms(q))
    return _outcomes(measured, options)


def _row(label: str, direct: float, service: float, *, difference: bool = True) -> None:
    added = f"{service - direct:+.1f}" if difference else ""
    ratio = f"{service / direct:.2f}" if direct else "-"
    print(f"| {label} | {direct:.1f} | {service:.1f} | {added} | {ratio} |")


def _outcomes(measured: Measured, options: Options) -> list[str]:
    direct, service = measured.direct, measured.service
    statuses = Counter(sample.status for sample in service.samples)
    answered = sum(count for status, count in statuses.items() if status.isdigit())
    failures = Counter(failure for sample in service.samples for failure in sample.failures)
    print(f"\nstatuses, orchestrator: {dict(statuses)}; direct: {dict(Counter(s.status for s in direct.samples))}")
    print(f"degraded: {sum(s.degraded for s in service.samples)} through the orchestrator (stage failures: "
          f"{dict(failures)}), {sum(s.degraded for s in direct.samples)} direct")  # fmt: skip
    print(f"reasoning fake, chat requests served during the orchestrator's run: {measured.reasoning_served}")
    for name, phase in (("direct", direct), ("orchestrator", service)):
        spent = ", ".join(f"{process} {seconds:.1f}" for process, seconds in phase.cpu_s.items())
        print(f"CPU seconds, {name} phase ({phase.seconds:.1f} s of wall time): {spent}")
    peak = f"{measured.peak_kib / 1024:.1f} MiB" if measured.peak_kib is not None else "unknown (no /proc)"
    print(f"orchestrator peak memory (VmHWM): {peak}")
    print(f"lost (no answer at all): {options.requests - answered}; answered but not 200: {answered - statuses['200']}")
    if statuses["200"] == options.requests:
        return []
    return [f"{options.requests - statuses['200']} of {options.requests} requests got no 200: {dict(statuses)}"]


def _kind(phase: Phase, kind: Kind) -> Phase:
    return Phase([sample for sample in phase.samples if sample.kind == kind], phase.seconds)
