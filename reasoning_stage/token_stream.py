"""Streaming the local backend's generation out of its worker thread, one decoding step at a time.

`TokenFeed` is the transformers streamer the `local` backend's worker thread generates with: it hands new token ids to
the event loop and stops the generation once nobody waits for it. `IncrementalText` turns those ids into text pieces.
torch is never imported here; the tensors arrive from `model.generate`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class GenerationStopped(Exception):
    """Raised inside `model.generate` by `TokenFeed` once nobody waits for the generation any more."""


class TokenFeed:
    """A transformers streamer (`put`/`end`): `deliver` gets each step's new token ids (the prompt, put first, is
    skipped), and once `stop` is set the next step raises `GenerationStopped`, ending the worker thread."""

    def __init__(self, deliver: Callable[[list[int]], None] | None = None) -> None:
        self.stop = threading.Event()
        self._deliver = deliver
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.stop.is_set():
            raise GenerationStopped("the caller stopped waiting for this generation")
        if not self._prompt_seen:
            self._prompt_seen = True
        elif self._deliver is not None:
            self._deliver([int(t) for t in value.reshape(-1).tolist()])

    def end(self) -> None:
        pass


class IncrementalText:
    """Turns a growing list of token ids into text pieces whose concatenation is the stripped decoding of them all.

    Each step decodes every id so far and sends what is new; it holds back trailing whitespace (it may end the
    answer, which is stripped) and a trailing U+FFFD (a character whose bytes are split across tokens).
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._sent = ""

    def add(self, ids: list[int]) -> str:
        self._ids.extend(ids)
        text = self._decode(self._ids).strip()
        return "" if text.endswith("\ufffd") else self._advance(text)

    def finish(self, final: str) -> str:
        """The rest of `final` (the whole answer as `generate` returns it) not sent yet."""
        return self._advance(final)

    def _advance(self, text: str) -> str:
        if not text.startswith(self._sent):  # decoding revised text already sent: wait for it to settle
            return ""
        piece, self._sent = text[len(self._sent) :], text
        return piece


def deliver_to(pieces: asyncio.Queue[list[int] | None]) -> Callable[[list[int]], None]:
    """A callback for the worker thread that puts token ids into `pieces` on this event loop."""
    loop = asyncio.get_running_loop()

    def deliver(ids: list[int]) -> None:
        loop.call_soon_threadsafe(pieces.put_nowait, ids)  # raises RuntimeError once the loop is closed

    return deliver
