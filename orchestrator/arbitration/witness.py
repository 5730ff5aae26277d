"""The second witness: a reader of the image's text independent of the vision stage, whose reading can overrule the
vision stage's on text, numbers, dates and times (`ORCH_ARBITRATION__WITNESS`).

A vision model can misread a total (90.00 where the receipt says 80.00), and an LLM answering from its description
repeats it: checked against that description alone, the claim is `supported`. The witness (`ocr`: RapidOCR,
`vision_stage.ocr.OcrReader`) reads the same image on its own, and `orchestrator.arbitration.verification` weighs
its rows against the vision stage's evidence (the rule is in its docstring): where it reads otherwise what the
vision stage read, the claim is `contradicted`, with both readings cited, and the usual re-ask and review follow.

The reading's life, driven by the pipeline (`orchestrator.analysis.pipeline`):

- `WitnessReading.start(witness, image, timeout_s)` once the route is known, on the reasoning route only (the
  vision-only route has no LLM claims to check): it runs beside the vision stage and the reasoning stage.
- `WitnessReading.lines()` at arbitration, the one place it is awaited: the lines read, waiting for them at most
  `timeout_s` (`ORCH_ARBITRATION__WITNESS_TIMEOUT_S`) and never past the request's deadline; None when the witness
  failed (a `VisionError`) or did not finish in time, logged as a warning: arbitration goes on without it, as it
  did before there was one. A witness never fails a request.
- `WitnessReading.cancel()` when the request ends, whether or not it was awaited (a fallback answer, a vision
  failure, a client gone).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from orchestrator.stages.deadline import bounded
from vision_stage.errors import VisionError
from vision_stage.types import DecodedImage, TextLine

log = logging.getLogger(__name__)


class Witness(Protocol):
    """Reads an image's text lines in reading order, raising only `VisionError`s (`vision_stage.ocr.OcrReader`)."""

    @property
    def name(self) -> str: ...

    async def read(self, image: DecodedImage, /) -> tuple[TextLine, ...]: ...

    async def aclose(self) -> None: ...


class WitnessReading:
    """One image's reading by the witness, under way (module docstring)."""

    def __init__(self, task: asyncio.Task[tuple[TextLine, ...]], name: str, timeout_s: float) -> None:
        self._task = task
        self.name = name
        self._timeout_s = timeout_s
        task.add_done_callback(_retrieve)

    @classmethod
    def start(cls, witness: Witness, image: DecodedImage, timeout_s: float) -> WitnessReading:
        """Start reading `image` now, in the background (call it inside the request's deadline)."""
        return cls(asyncio.create_task(witness.read(image), name=f"{witness.name} witness"), witness.name, timeout_s)

    async def lines(self) -> tuple[TextLine, ...] | None:
        """The lines read, or None when the witness failed or was not done in time (logged)."""
        if self._task.cancelled():
            return None
        timeout = bounded(self._timeout_s)
        try:
            return await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            log.warning("the %s witness did not finish reading within %.2f s: arbitrating without it", self.name,
                        timeout)  # fmt: skip
        except VisionError as exc:
            log.warning("the %s witness failed: %s: %s; arbitrating without it", self.name, type(exc).__name__, exc)
        self.cancel()
        return None

    def cancel(self) -> None:
        """Stop waiting for the reading (a worker thread already reading finishes on its own)."""
        self._task.cancel()


def _retrieve(task: asyncio.Task[tuple[TextLine, ...]]) -> None:
    """Take a failed reading's exception, so that one nobody awaited is not reported as never retrieved."""
    if not task.cancelled():
        task.exception()
