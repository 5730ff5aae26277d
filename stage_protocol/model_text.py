"""Reading what a language model writes, liberally: thinking and answer tags, and JSON inside text. Pure functions.

Both stages and the orchestrator read model text through here: the vision stage its answers and JSON descriptions,
the reasoning stage a thinking block left in the content, the orchestrator a `response_format: json` answer.

Thinking comes in several shapes, depending on the model and on what the server stripped:

- `<think>…</think>answer`: a server without a reasoning parser leaves the block in the content;
- `…</think>answer`: the chat template opened the block in the prompt, so only the closing tag was generated;
- `<think>…` with no end: the token limit cut the thinking, and there is no answer;
- `<answer>…</answer>`: GLM-4.1V-Thinking wraps its final answer so (after its `</think>`), and a server's reasoning
  parser leaves these tags in the content.

JSON inside text is found the way a person would: inside a code fence first, else at each `{` or `[` in turn; what
does not parse as written is repaired by `json_repair` (trailing commas, single quotes, unquoted keys, comments, and an
object cut off by the token limit, closed where it stopped), the library LLM tool-call parsers use for exactly this.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from json_repair import repair_json

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_-]*)[ \t]*\r?\n?(.*?)(?:```|\Z)", re.DOTALL)
MAX_STARTS = 64
"""Starting points tried for strict JSON: prose before the object may hold braces and brackets of its own."""
MAX_REPAIR_CHARS = 64_000
"""Longer candidates are not repaired: json_repair is pure Python, and an answer within our token limits is shorter."""
MAX_REPAIRS = 4
"""Repairs tried in all for one text (json_repair's time grows with what it is given)."""
MAX_REPAIR_DEPTH = 32
"""Deeper nesting is not repaired: no description nests so deep, and json_repair's time grows fast with depth."""


def split_thinking(text: str) -> tuple[str | None, str]:
    """(thinking, answer) of a model's text, for every shape in the module docstring; thinking is None when there
    was none (an empty block too), and the answer is "" when the thinking was cut off."""
    thinking: str | None = None
    answer = text
    if THINK_CLOSE in text:
        head, _, answer = text.partition(THINK_CLOSE)
        thinking = head.split(THINK_OPEN, 1)[-1].strip() or None
    elif text.lstrip().startswith(THINK_OPEN):
        return text.lstrip()[len(THINK_OPEN) :].strip() or None, ""
    return thinking, _answer_part(answer).strip()


def _answer_part(text: str) -> str:
    """The content of `<answer>…</answer>` (to the end when unclosed), else `text`; a stray tag is dropped."""
    if ANSWER_OPEN in text:
        inside = text.partition(ANSWER_OPEN)[2]
        return inside.partition(ANSWER_CLOSE)[0]
    return text.replace(ANSWER_CLOSE, "")


@dataclass(frozen=True)
class FoundJson:
    """A JSON value found in text: the value, where it was (`start`, `end` in the text), and whether it had to be
    repaired to parse."""

    value: object
    start: int
    end: int
    repaired: bool

    def outside(self, text: str) -> str:
        """The text around the value, without fence markers or blank lines."""
        around = re.sub(r"```[A-Za-z0-9_-]*", "", text[: self.start] + "\n" + text[self.end :])
        return re.sub(r"\n\s*\n", "\n", around).strip()


def find_json(
    text: str, *, kinds: tuple[type, ...] = (dict, list), parse_float: Callable[[str], object] = float
) -> FoundJson | None:
    """The first JSON value of one of `kinds` in `text` (module docstring), or None when there is none, even
    repaired. An empty object or list counts: what it means is the caller's to say. `parse_float` reads numbers
    with a fraction or exponent (`str` keeps "80.00" as written), except in repaired JSON, where json_repair has
    already read them as floats.

    Repair is for what is plainly JSON written loosely: text in a code fence, or a bracket that opens like JSON (a
    quoted key or value, a nested bracket, a number) or an object whose first key is bare but that begins a line.
    A bracket in the middle of prose ("a receipt from [BLUE BOTTLE CAFE]", "(see {note: blurry})") is prose."""
    decoder = json.JSONDecoder(parse_float=parse_float)
    repairs = [MAX_REPAIRS]
    for start, end in _fenced(text):
        found = _parse_at(text, start, end, kinds, decoder, repairs, fenced=True)
        if found is not None:
            return found
    return _parse_at(text, 0, len(text), kinds, decoder, repairs, fenced=False)


def _fenced(text: str) -> list[tuple[int, int]]:
    """The spans of code-fence bodies (an unclosed fence runs to the end), JSON-labelled or unlabelled ones first."""
    spans = [(m.start(2), m.end(2), m.group(1).lower()) for m in _FENCE.finditer(text)]
    return [(s, e) for s, e, label in spans if label in ("", "json", "json5")] + [
        (s, e) for s, e, label in spans if label not in ("", "json", "json5")
    ]


def _parse_at(
    text: str,
    lo: int,
    hi: int,
    kinds: tuple[type, ...],
    decoder: json.JSONDecoder,
    repairs: list[int],
    *,
    fenced: bool,
) -> FoundJson | None:
    """A value of `kinds` at one of the outermost `{` or `[` between `lo` and `hi`: strict at each first, then
    repaired where it may be (`find_json`), within what is left of `repairs`. Brackets nested in an earlier one are
    not starts of their own, so a cut-off object is repaired whole rather than replaced by the first complete object
    inside it."""
    opens = "{" * (dict in kinds) + "[" * (list in kinds)
    starts = _outermost(text, lo, hi, opens)
    for start in starts:
        try:
            value, length = decoder.raw_decode(text[start:hi])
        except (ValueError, RecursionError):  # JSONDecodeError, and integers past Python's digit limit
            continue
        if isinstance(value, kinds):
            return FoundJson(value, start, start + length, repaired=False)
    for start in starts:
        if repairs[0] <= 0:
            break
        if not (fenced or _opens_like_json(text, start)):
            continue
        repairs[0] -= 1
        repaired = _repaired(text[start:hi])
        if repaired is not None and isinstance(repaired[0], dict if text[start] == "{" else list):
            return FoundJson(repaired[0], start, start + repaired[1], repaired=True)
    return None


def _opens_like_json(text: str, start: int) -> bool:
    """Whether the bracket at `start` opens like JSON rather than like prose in brackets (`find_json`)."""
    after = text[start + 1 : start + 64].lstrip()
    if after[:1] in ('"', "'", "{", "[") or (text[start] == "[" and after[:1] in "-0123456789]" and after):
        return True
    line_start = text[:start].rsplit("\n", 1)[-1].strip() in ("", "```json", "```")
    return text[start] == "{" and line_start and bool(re.match(r"[A-Za-z_\u4e00-\u9fff][\w \u4e00-\u9fff-]*:", after))


def _outermost(text: str, lo: int, hi: int, opens: str) -> list[int]:
    """Where each outermost bracket of `opens` begins (up to `MAX_STARTS`): a bracket inside any other (of either
    kind) is not one, nor is what sits in double-quoted strings; an unclosed bracket runs to `hi`."""
    starts: list[int] = []
    depth, quoted, escaped = 0, False, False
    for index in range(lo, hi):
        char = text[index]
        if quoted:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
            continue
        if char in "{[":
            if depth == 0 and char in opens:
                starts.append(index)
                if len(starts) == MAX_STARTS:
                    break
            depth += 1
        elif char in "}]" and depth:
            depth -= 1
        elif char == '"' and depth:
            quoted = True
    return starts


def _repaired(candidate: str) -> tuple[object, int] | None:
    """The value `json_repair` makes of `candidate` (cut after the last closing bracket when one follows prose), and
    how much of `candidate` it used."""
    end = max(candidate.rfind("}"), candidate.rfind("]")) + 1
    tail = candidate[end:]
    used = end if end > 0 and tail.strip() and not _looks_like_json(tail) else len(candidate)
    if used > MAX_REPAIR_CHARS or _depth(candidate[:used]) > MAX_REPAIR_DEPTH:
        return None
    try:
        value = repair_json(candidate[:used], return_objects=True, skip_json_loads=True)
    except (ValueError, RecursionError):  # json_repair documents none, but it is given arbitrary text
        return None
    return (value, used) if isinstance(value, dict | list) else None


def _depth(text: str) -> int:
    """How deeply brackets nest in `text` (strings not told apart: an upper bound is all that is needed)."""
    depth = deepest = 0
    for char in text:
        if char in "{[":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "}]" and depth:
            depth -= 1
    return deepest


def _looks_like_json(tail: str) -> bool:
    """Whether text after the last bracket could still be JSON of the value (a cut string, key or number)."""
    return bool(re.match(r'\s*[,:"\'\d]', tail)) and "\n\n" not in tail
