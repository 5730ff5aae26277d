"""What every stage backend has, whatever it does: a `name`, a `model`, `health` and `aclose`.

Each stage draws its own backend protocol on this one, adding its own `generate` (`vision_stage.backend`,
`reasoning_stage.backend`); the stage servers (`stage_protocol.server.app`) need no more than this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str = ""


@runtime_checkable
class StageBackend(Protocol):
    """A loaded backend. `name` is its config value (`ocr`, `local`, `remote`, …); `model` names what it runs."""

    name: str
    model: str

    async def health(self) -> Health: ...

    async def aclose(self) -> None: ...
