"""The `none` backend: no LLM is deployed, so every question is answered from the image alone."""

from __future__ import annotations

from reasoning_stage.backend import Health
from reasoning_stage.errors import ReasoningDisabled
from reasoning_stage.types import ReasoningRequest, ReasoningResult


class NoneReasoningBackend:
    name = "none"
    model = "none"

    async def generate(self, request: ReasoningRequest) -> ReasoningResult:
        raise ReasoningDisabled("no reasoning stage is deployed (reasoning backend 'none')")

    async def health(self) -> Health:
        return Health(ok=True, detail="vision-only by design")

    async def aclose(self) -> None:
        return None
