"""Prometheus metrics (`GET /metrics`), one registry per app.

Per request (`MetricsMiddleware`, from the request's record, `orchestrator.observability.record`):
`orchestrator_requests_total{endpoint, mode, profile, outcome}`, `orchestrator_requests_in_flight`,
`orchestrator_stage_seconds{stage, backend}` (each stage's share of the request), `orchestrator_degraded_total{stage}`,
`orchestrator_arbitration_total{status}`, `orchestrator_vision_cache_total{result}`. Bulk work this process ran:
`orchestrator_batch_requests_total{result}` (answered, failed) and `orchestrator_batches_total{status}`. At scrape
time (`StateCollector`): `orchestrator_breaker_state{stage, endpoint, state}` (1 for the endpoint's current state, 0
for the others) and `orchestrator_endpoint_in_flight{stage, endpoint}`; for an in-process `glm` backend's batching
engine, `orchestrator_engine_requests{stage, endpoint, state}` (running, waiting), `orchestrator_engine_steps_total`
(`orchestrator_engine_ridden_steps_total` of them inside a prefill's forward), `orchestrator_engine_mean_batch`,
`orchestrator_engine_admitted_total`, `orchestrator_engine_mean_queue_seconds`,
`orchestrator_engine_reuse_total{store, result}` (image-prefix and encoder lookups),
`orchestrator_engine_encoder_graph_replays_total` (vision encoder runs replayed as a CUDA graph of their grid) and
`orchestrator_engine_recompile_limit_hits_total`.

`outcome` is `ok`, `degraded`, or the error `type` of a failed request (`vision_unavailable`, `overloaded`, …) — or
`http_<status>` when no error type was recorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Receive, Scope, Send

from batch_engine.types import EngineStats
from orchestrator.observability.record import RecordingMiddleware, RequestRecord
from orchestrator.stages.endpoints import EndpointStatus

BREAKER_STATES = ("closed", "open", "half_open")
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "orchestrator_requests",
            "Requests by endpoint, mode, profile and outcome.",
            ["endpoint", "mode", "profile", "outcome"],
            registry=self.registry,
        )
        self.in_flight = Gauge("orchestrator_requests_in_flight", "Requests being answered.", registry=self.registry)
        self.stage_seconds = Histogram(
            "orchestrator_stage_seconds",
            "Time each stage took within a request.",
            ["stage", "backend"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.degraded = Counter(
            "orchestrator_degraded", "Answers given without a stage that failed.", ["stage"], registry=self.registry
        )
        self.arbitration = Counter(
            "orchestrator_arbitration", "Arbitration outcomes of reasoning answers.", ["status"], registry=self.registry
        )
        self.cache = Counter(
            "orchestrator_vision_cache", "Vision cache lookups: hit or miss.", ["result"], registry=self.registry
        )
        self.batch_requests = Counter(
            "orchestrator_batch_requests", "Batch requests run, by result.", ["result"], registry=self.registry
        )
        self.batches = Counter("orchestrator_batches", "Batches ended, by status.", ["status"], registry=self.registry)

    def request(self, answered: bool) -> None:
        """A batch request run by this process (`orchestrator.bulk`): `answered` (2xx) or not."""
        self.batch_requests.labels("answered" if answered else "failed").inc()

    def batch(self, status: str) -> None:
        """A batch this process ended, with its final status."""
        self.batches.labels(status).inc()

    def observe(self, record: RequestRecord) -> None:
        """Count one finished request from its record."""
        analysis = record.analysis
        labels = (record.endpoint, str(analysis.get("mode") or "-"), str(analysis.get("profile") or "-"))
        self.requests.labels(*labels, record.outcome).inc()
        timings = analysis.get("timings_ms")
        for stage in ("vision", "reasoning"):
            backend, ms = analysis.get(stage), timings.get(stage) if isinstance(timings, dict) else None
            if backend and isinstance(ms, int | float):
                self.stage_seconds.labels(stage, str(backend)).observe(ms / 1000.0)
        failures = analysis.get("failures")
        for failure in failures if isinstance(failures, list) else ():
            self.degraded.labels(str(failure).split(":", 1)[0]).inc()
        if analysis.get("arbitration"):
            self.arbitration.labels(str(analysis["arbitration"])).inc()
        if "vision_cached" in analysis:
            self.cache.labels("hit" if analysis["vision_cached"] else "miss").inc()


class StateCollector(Collector):
    """Breaker states and endpoint load, read when Prometheus scrapes."""

    def __init__(self, statuses: Callable[[], dict[str, tuple[EndpointStatus, ...]]]) -> None:
        self._statuses = statuses

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        breaker = GaugeMetricFamily(
            "orchestrator_breaker_state",
            "Circuit breaker state per endpoint (1 = current).",
            labels=["stage", "endpoint", "state"],
        )
        in_flight = GaugeMetricFamily(
            "orchestrator_endpoint_in_flight", "Calls under way per endpoint.", labels=["stage", "endpoint"]
        )
        engine = _EngineFamilies()
        for stage, statuses in self._statuses().items():
            for status in statuses:
                for state in BREAKER_STATES:
                    breaker.add_metric([stage, status.endpoint, state], 1.0 if status.breaker == state else 0.0)
                in_flight.add_metric([stage, status.endpoint], float(status.in_flight))
                if status.engine is not None:
                    engine.add([stage, status.endpoint], status.engine)
        yield breaker
        yield in_flight
        yield from engine.families()


class _EngineFamilies:
    """The in-process batching engine's counters (`batch_engine.types.EngineStats`), per endpoint."""

    def __init__(self) -> None:
        labels = ["stage", "endpoint"]
        self.requests = GaugeMetricFamily(
            "orchestrator_engine_requests",
            "Requests in the batching engine, running or waiting.",
            labels=[*labels, "state"],
        )
        self.steps = CounterMetricFamily("orchestrator_engine_steps", "Decode steps run.", labels=labels)
        self.ridden = CounterMetricFamily(
            "orchestrator_engine_ridden_steps", "Decode steps run inside a prefill's forward.", labels=labels
        )
        self.batch = GaugeMetricFamily("orchestrator_engine_mean_batch", "Mean rows per decode step.", labels=labels)
        self.admitted = CounterMetricFamily("orchestrator_engine_admitted", "Requests given a slot.", labels=labels)
        self.queue = GaugeMetricFamily(
            "orchestrator_engine_mean_queue_seconds", "Mean wait for a slot, per request admitted.", labels=labels
        )
        self.reuse = CounterMetricFamily(
            "orchestrator_engine_reuse",
            "Lookups of image prefixes and encoder outputs.",
            labels=[*labels, "store", "result"],
        )
        self.replays = CounterMetricFamily(
            "orchestrator_engine_encoder_graph_replays",
            "Vision encoder runs replayed as a CUDA graph of their image's grid.",
            labels=labels,
        )
        self.limit = CounterMetricFamily(
            "orchestrator_engine_recompile_limit_hits",
            "Times torch.compile reached its recompile limit in this process (past it, compiled code runs uncompiled).",
            labels=labels,
        )

    def add(self, labels: list[str], stats: EngineStats) -> None:
        self.requests.add_metric([*labels, "running"], float(stats.running))
        self.requests.add_metric([*labels, "waiting"], float(stats.waiting))
        self.steps.add_metric(labels, float(stats.steps))
        self.ridden.add_metric(labels, float(stats.ridden))
        self.batch.add_metric(labels, stats.mean_batch)
        self.admitted.add_metric(labels, float(stats.admitted))
        self.queue.add_metric(labels, stats.mean_queue_ms / 1000.0)
        self.reuse.add_metric([*labels, "prefix", "hit"], float(stats.prefix_hits))
        self.reuse.add_metric([*labels, "prefix", "miss"], float(stats.prefix_misses))
        self.reuse.add_metric([*labels, "encoder", "hit"], float(stats.encoder_hits))
        self.replays.add_metric(labels, float(stats.encoder_replays))
        self.limit.add_metric(labels, float(stats.recompile_limit_hits))

    def families(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield from (self.requests, self.steps, self.ridden, self.batch, self.admitted, self.queue, self.reuse)
        yield from (self.replays, self.limit)


class MetricsMiddleware(RecordingMiddleware):
    """Counts every API request (paths under `paths`) once its response is complete."""

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: tuple[str, ...] = ("/v1/", "/infer", "/caption")) -> None:
        super().__init__(app, paths)
        self.metrics = metrics

    async def serve(self, record: RequestRecord, scope: Scope, receive: Receive, send: Send) -> None:
        self.metrics.in_flight.inc()
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.metrics.in_flight.dec()
            if record.duration_ms is None:
                record.duration_ms = round((time.perf_counter() - started) * 1000, 1)
            self.metrics.observe(record)
