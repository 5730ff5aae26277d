"""The `none` backend: vision-only by design, so it refuses to reason but is healthy."""

from __future__ import annotations

import pytest

from reasoning_stage.backend import ReasoningBackend
from reasoning_stage.errors import ReasoningDisabled
from reasoning_stage.none import NoneReasoningBackend
from reasoning_stage.types import ChatMessage, ReasoningRequest


async def test_none_backend_refuses_with_reasoning_disabled() -> None:
    backend = NoneReasoningBackend()
    with pytest.raises(ReasoningDisabled, match="none"):
        await backend.generate(ReasoningRequest(messages=(ChatMessage("user", "What is the total?"),)))


async def test_none_backend_is_healthy_and_closes() -> None:
    backend = NoneReasoningBackend()
    assert isinstance(backend, ReasoningBackend)
    assert backend.name == "none"
    health = await backend.health()
    assert health.ok
    await backend.aclose()
