"""Telling a degenerate reasoning answer from an answer. Pure.

A small or overthinking model can loop until its token limit ("a web server that is using a web server that is
using …"), write nothing but punctuation, or hand the question back. None of these is an answer, and
none may be `agreed` or `corrected` by the arbiter: the pipeline replaces a degenerate first answer by the vision
stage's own (degraded, with a notice), and a degenerate re-asked answer leaves the first one marked for review.

- `empty`: no word at all (`stage_protocol.loops.words`: letters, digits or CJK characters);
- `loops`: `stage_protocol.loops.loops`;
- `restates`: the question again and nothing else (a "Question:" label aside). An answer that adds a single word of
  its own ("Total amount: 54.06" to "Total amount?") is an answer; so is a verbatim transcription of the image's
  text, which a question may ask for.
"""

from __future__ import annotations

from typing import Literal

from stage_protocol.loops import loops, words

Degeneration = Literal["empty", "loops", "restates"]
LABELS = frozenset({"question", "q", "问", "题", "问题"})
"""Words a model puts before a question it hands back ("Question: …", "问题：…")."""
WHAT: dict[Degeneration, str] = {
    "empty": "the answer holds no words",
    "loops": "the answer repeats itself in a loop",
    "restates": "the answer only restates the question or its prompt",
}


def degeneration(answer: str, question: str) -> Degeneration | None:
    """What is wrong with `answer` to `question`, or None."""
    said = words(answer)
    if not said:
        return "empty"
    if loops(answer):
        return "loops"
    asked = words(question)
    if asked and _contains(said, asked) and set(said) - set(asked) <= LABELS:
        return "restates"
    return None


def _contains(longer: list[str], run: list[str]) -> bool:
    size = len(run)
    return any(longer[i : i + size] == run for i in range(len(longer) - size + 1))
