"""The one seam between the orchestrator and whatever looks at images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from vision_stage.types import VisionRequest, VisionResult


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str = ""


@runtime_checkable
class VisionBackend(Protocol):
    """A loaded vision backend. `name` is the config value (`ocr`, `glm`, `remote`); `model` names what it runs."""

    name: str
    model: str

    async def generate(self, request: VisionRequest) -> VisionResult:
        """Look at the image; raise a `vision_stage.errors.VisionError` when that fails."""
        ...

    async def health(self) -> Health: ...

    async def aclose(self) -> None: ...
