"""The one seam between the orchestrator and whatever reasons over text."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from reasoning_stage.types import ReasoningDelta, ReasoningRequest, ReasoningResult


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str = ""


@runtime_checkable
class ReasoningBackend(Protocol):
    """A loaded reasoning backend. `name` is the config value (`local`, `none`, `remote`); `model` names what it
    runs."""

    name: str
    model: str

    async def generate(self, request: ReasoningRequest) -> ReasoningResult:
        """Continue the chat; raise a `reasoning_stage.errors.ReasoningError` when that fails."""
        ...

    async def health(self) -> Health: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class StreamingReasoningBackend(ReasoningBackend, Protocol):
    """A reasoning backend that can also stream its answer as it is generated."""

    def stream(self, request: ReasoningRequest) -> AsyncIterator[ReasoningDelta]:
        """Deltas of text or thinking, the last one carrying the finish reason and token counts."""
        ...
