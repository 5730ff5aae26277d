"""What every stage backend has, whatever it does: a `name`, a `model`, `health` and `aclose`; and the `Delta`, one
piece of a streamed answer, as both stage servers stream it.

Each stage draws its own backend protocol on this one, adding its own `generate` (`vision_stage.backend`,
`reasoning_stage.backend`); the stage servers (`stage_protocol.server.app`) need no more than this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length"]


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


@dataclass(frozen=True)
class Delta:
    """One piece of a streamed answer: text, or thinking, or (last) the finish reason and token counts. The reasoning
    stage's backends stream these (`reasoning_stage.types.ReasoningDelta`); the vision server builds them from a whole
    answer."""

    text: str = ""
    thinking: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
