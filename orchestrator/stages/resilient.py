"""The vision and reasoning backends built on `ResilientStage`, and the vision fallback chain.

`ResilientVision` and `ResilientReasoning` are backends themselves (the same `generate`/`health`/`aclose`, and
`stream` for reasoning): the pipeline does not know whether one endpoint or several stand behind them.
`FallbackVision` asks its primary (`glm`, `remote`) and, when that cannot answer — unavailable, open breakers,
garbage, overloaded — the `ocr` backend, and says so in the result (`VisionResult.fallback`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
from typing import ClassVar, Generic, TypeVar

from orchestrator.stage_settings import PolicySettings
from orchestrator.stages.cache import CachedVision
from orchestrator.stages.endpoints import EndpointStatus, ResilientStage, StageErrors
from reasoning_stage.backend import ReasoningBackend, StreamingReasoningBackend
from reasoning_stage.errors import ReasoningInvalidOutput, ReasoningOverloaded, ReasoningUnavailable
from reasoning_stage.types import ReasoningDelta, ReasoningRequest, ReasoningResult
from stage_protocol.backend import Health, StageBackend
from vision_stage.backend import VisionBackend
from vision_stage.errors import ImageRejected, VisionInvalidOutput, VisionOverloaded, VisionUnavailable
from vision_stage.types import VisionFallback, VisionRequest, VisionResult

log = logging.getLogger(__name__)

B = TypeVar("B", bound=StageBackend)

VISION_ERRORS = StageErrors(
    "vision",
    VisionUnavailable,
    (VisionUnavailable, VisionInvalidOutput),
    lambda message, retry_after: VisionOverloaded(message, retry_after_s=retry_after, retryable=False),
    caller_faults=(ImageRejected,),
)
REASONING_ERRORS = StageErrors(
    "reasoning",
    ReasoningUnavailable,
    (ReasoningUnavailable, ReasoningInvalidOutput),
    lambda message, retry_after: ReasoningOverloaded(message, retry_after_s=retry_after, retryable=False),
)


class _Resilient(Generic[B]):
    """A stage's endpoints behind its policy (`orchestrator.stages.endpoints`), named after the first one; `ERRORS`
    are the stage's."""

    ERRORS: ClassVar[StageErrors]

    def __init__(self, endpoints: Sequence[tuple[str, B]], settings: PolicySettings, *, reserve_s: float = 0.0) -> None:
        first = endpoints[0][1]
        self.name = first.name
        self.model = first.model
        self.stage: ResilientStage[B] = ResilientStage(self.ERRORS, endpoints, settings, reserve_s=reserve_s)

    async def health(self) -> Health:
        healths = await asyncio.gather(*(e.backend.health() for e in self.stage.endpoints))
        ok, detail = _summary(self.stage.statuses(), [(h.ok, h.detail) for h in healths])
        return Health(ok=ok, detail=detail)

    async def aclose(self) -> None:
        await _close_all([e.backend.aclose() for e in self.stage.endpoints])


class ResilientVision(_Resilient[VisionBackend]):
    """Vision endpoints behind the stage's policy."""

    ERRORS = VISION_ERRORS

    async def generate(self, request: VisionRequest) -> VisionResult:
        return await self.stage.call(lambda endpoint: endpoint.backend.generate(request))


class ResilientReasoning(_Resilient[ReasoningBackend]):
    """Reasoning endpoints behind the stage's policy; `stream` retries only before the first delta."""

    ERRORS = REASONING_ERRORS

    async def generate(self, request: ReasoningRequest) -> ReasoningResult:
        return await self.stage.call(lambda endpoint: endpoint.backend.generate(request))

    def stream(self, request: ReasoningRequest) -> AsyncIterator[ReasoningDelta]:
        return self.stage.stream(lambda backend: _deltas(backend, request))


class FallbackVision:
    """`primary`, and `fallback` when the primary cannot answer (module docstring)."""

    def __init__(self, primary: VisionBackend, fallback: VisionBackend) -> None:
        self.name = primary.name
        self.model = primary.model
        self.primary = primary
        self.fallback = fallback

    async def generate(self, request: VisionRequest) -> VisionResult:
        try:
            return await self.primary.generate(request)
        except (VisionUnavailable, VisionInvalidOutput) as exc:
            log.warning(
                "vision backend %s failed (%s: %s); %s answers",
                self.primary.name,
                type(exc).__name__,
                exc,
                self.fallback.name,
            )
            result = await self.fallback.generate(request)
            why = VisionFallback(self.primary.name, type(exc).__name__, str(exc))
            return dataclasses.replace(result, fallback=why)

    async def health(self) -> Health:
        primary, fallback = await asyncio.gather(self.primary.health(), self.fallback.health())
        detail = f"{primary.detail}; fallback {self.fallback.name}: {'ok' if fallback.ok else fallback.detail}"
        return Health(ok=primary.ok or fallback.ok, detail=detail)

    async def aclose(self) -> None:
        await _close_all([self.primary.aclose(), self.fallback.aclose()])


def endpoint_statuses(backend: object) -> tuple[EndpointStatus, ...]:
    """The endpoints behind a backend built by `orchestrator.wiring` (a fallback's after its primary's); none for
    another backend (an injected fake)."""
    if isinstance(backend, ResilientVision | ResilientReasoning):
        return backend.stage.statuses()
    if isinstance(backend, FallbackVision):
        return endpoint_statuses(backend.primary) + endpoint_statuses(backend.fallback)
    if isinstance(backend, CachedVision):
        return endpoint_statuses(backend.backend)
    return ()


def _deltas(backend: ReasoningBackend, request: ReasoningRequest) -> AsyncIterator[ReasoningDelta]:
    if isinstance(backend, StreamingReasoningBackend):
        return backend.stream(request)
    return _generated(backend, request)


async def _generated(backend: ReasoningBackend, request: ReasoningRequest) -> AsyncIterator[ReasoningDelta]:
    """A backend that does not stream, as one text delta and a closing one."""
    result = await backend.generate(request)
    yield ReasoningDelta(text=result.text, thinking=result.thinking or "")
    yield ReasoningDelta(
        finish_reason=result.finish_reason,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
    )


def _summary(statuses: Sequence[EndpointStatus], healths: Sequence[tuple[bool, str]]) -> tuple[bool, str]:
    """Ready when some endpoint is healthy and its breaker is not open; the detail names each endpoint."""
    parts = []
    ok = False
    for status, (healthy, detail) in zip(statuses, healths, strict=True):
        usable = healthy and status.breaker != "open"
        ok = ok or usable
        breaker = f"breaker {status.breaker}" + (f", trial in {status.retry_in_s:.1f} s" if status.retry_in_s else "")
        parts.append(f"{status.endpoint}: {breaker}; {detail}")
    return ok, " | ".join(parts)


async def _close_all(closings: list[object]) -> None:
    results = await asyncio.gather(*closings, return_exceptions=True)  # type: ignore[call-overload]
    for result in results:
        if isinstance(result, BaseException):
            raise result
