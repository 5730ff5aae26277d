"""Telling a degenerate reasoning answer from an answer. Pure.

A small or overthinking model can loop until its token limit ("a web server that is using a web server that is
using …"), write nothing but punctuation, or hand the question or its prompt back. None of these is an answer, and
none may be `agreed` or `corrected` by the arbiter: the pipeline replaces a degenerate first answer by the vision
stage's own (degraded, with a notice), and a degenerate re-asked answer leaves the first one marked for review.

- `empty`: no word at all (`stage_client.loops.words`: letters, digits or CJK characters);
- `loops`: `stage_client.loops.loops`;
- `restates`: the question again (with at most two words around it, "Question: …"), or a run copied from the prompt
  that makes up at least half of the prompt's words and is at least `MIN_COPIED_WORDS` long.
"""

from __future__ import annotations

from typing import Literal

from stage_client.loops import loops, words

Degeneration = Literal["empty", "loops", "restates"]
MIN_COPIED_WORDS = 20
WHAT: dict[Degeneration, str] = {
    "empty": "the answer holds no words",
    "loops": "the answer repeats itself in a loop",
    "restates": "the answer only restates the question or its prompt",
}


def degeneration(answer: str, question: str, prompt: str) -> Degeneration | None:
    """What is wrong with `answer` to `question` (asked with `prompt`, the user message the model read), or None."""
    said = words(answer)
    if not said:
        return "empty"
    if loops(answer):
        return "loops"
    asked = words(question)
    if asked and len(said) - len(asked) <= 2 and _contains(said, asked):
        return "restates"
    shown = words(prompt)
    if len(said) >= MIN_COPIED_WORDS and 2 * len(said) >= len(shown) and _contains(shown, said):
        return "restates"
    return None


def _contains(longer: list[str], run: list[str]) -> bool:
    size = len(run)
    return any(longer[i : i + size] == run for i in range(len(longer) - size + 1))
