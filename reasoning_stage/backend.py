"""The one seam between the orchestrator and whatever reasons over text."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from reasoning_stage.types import ReasoningDelta, ReasoningRequest, ReasoningResult
from stage_protocol.backend import Health, StageBackend

__all__ = ["Health", "ReasoningBackend", "StreamingReasoningBackend"]


@runtime_checkable
class ReasoningBackend(StageBackend, Protocol):
    """A loaded reasoning backend (`name`: `local`, `none`, `remote`), with `health` and `aclose` as every stage
    backend has them (`stage_protocol.backend`)."""

    async def generate(self, request: ReasoningRequest) -> ReasoningResult:
        """Continue the chat; raise a `reasoning_stage.errors.ReasoningError` when that fails."""
        ...


@runtime_checkable
class StreamingReasoningBackend(ReasoningBackend, Protocol):
    """A reasoning backend that can also stream its answer as it is generated."""

    def stream(self, request: ReasoningRequest) -> AsyncIterator[ReasoningDelta]:
        """Deltas of text or thinking, the last one carrying the finish reason and token counts."""
        ...
