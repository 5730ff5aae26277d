"""Telling a model that loops ("a web server that is using a web server that is using …") from one that writes.
Pure functions, shared by both stages' generation guards and the orchestrator's check of an answer.

A loop is the same run of tokens (or words) repeated back to back at the end of the text, at least `MIN_REPEATS`
times and over at least `MIN_SPAN` tokens. A model that loops goes on until its token limit, so the loop is where
the text ends, and it repeats far more often than anything written on purpose: tables, statements and receipts
repeat rows and words, but rarely the same row eight times in a row. (A share of repeated n-grams over the whole
text was tried as a second test and dropped: it flags ordinary tables and receipts.)

Text is cut into words for this: a run of letters or digits is one word, and every CJK character is one (Chinese
has no spaces), so the same measure serves both languages.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import StoppingCriteria

MIN_REPEATS = 8
"""Back-to-back repeats of a run that make a loop."""
MIN_SPAN = 32
"""Tokens the repeats must cover together: a short word said eight times is not yet a loop."""
MAX_PERIOD = 64
"""The longest run looked for."""
_WORD = re.compile(r"[\u3400-\u9fff\uf900-\ufaff\u3040-\u30ff]|[^\W_]+", re.UNICODE)


def repeats_at_end(tokens: Sequence[object], *, min_repeats: int = MIN_REPEATS, min_span: int = MIN_SPAN) -> bool:
    """Whether `tokens` end with one run repeated `min_repeats` times back to back, covering `min_span` or more."""
    count = len(tokens)
    for period in range(1, MAX_PERIOD + 1):
        if period * min_repeats > count:
            break
        span = max(period * min_repeats, (min_span + period - 1) // period * period)
        if span > count:
            continue
        if all(tokens[count - k] == tokens[count - k - period] for k in range(1, span - period + 1)):
            return True
    return False


def words(text: str) -> list[str]:
    """`text` as words for loop detection (module docstring), lower-cased."""
    return [word.lower() for word in _WORD.findall(text)]


def loops(text: str) -> bool:
    """Whether `text` loops (module docstring)."""
    return repeats_at_end(words(text))


LOOP_NOTE = "the model's answer fell into a loop and was cut off there"
"""The note a vision result carries when its answer was cut at a loop."""
WINDOW = MAX_PERIOD * MIN_REPEATS
"""The generated tokens a guard looks back over at each step."""


def loop_stopper(prompt_length: int) -> StoppingCriteria:
    """A transformers stopping criterion that ends generation once the generated tokens (after `prompt_length`)
    loop (`repeats_at_end`): an in-process model stops within a step of a loop being certain, instead of filling its
    budget with it. torch and transformers are imported here, when an in-process backend asks."""
    import torch
    from transformers import StoppingCriteria

    class LoopStopper(StoppingCriteria):
        def __call__(
            self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object
        ) -> torch.BoolTensor:
            start = max(prompt_length, input_ids.shape[1] - WINDOW)
            looping = [repeats_at_end(row[start:].tolist()) for row in input_ids]
            return torch.tensor(looping, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]

    return LoopStopper()


class LoopWatch:
    """Watches a streamed answer for a loop: `add` each piece as it arrives; it says whether the text now loops,
    looking every `every` characters at the last `window` (a remote server's generation can only be stopped by
    leaving its stream, which the caller then does)."""

    def __init__(self, every: int = 200, window: int = 4000) -> None:
        self._text = ""
        self._unchecked = 0
        self._every = every
        self._window = window

    def add(self, piece: str) -> bool:
        self._text = (self._text + piece)[-self._window :]
        self._unchecked += len(piece)
        if self._unchecked < self._every:
            return False
        self._unchecked = 0
        return loops(self._text)
