"""The one seam between the orchestrator and whatever looks at images."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from stage_protocol.backend import Health, StageBackend
from vision_stage.types import VisionRequest, VisionResult

__all__ = ["Health", "VisionBackend"]


@runtime_checkable
class VisionBackend(StageBackend, Protocol):
    """A loaded vision backend (`name`: `ocr`, `glm`, `remote`), with `health` and `aclose` as every stage backend
    has them (`stage_protocol.backend`)."""

    async def generate(self, request: VisionRequest) -> VisionResult:
        """Look at the image; raise a `vision_stage.errors.VisionError` when that fails."""
        ...
