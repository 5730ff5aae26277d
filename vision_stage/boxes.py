"""Grounding boxes in what a GLM vision model writes. Pure functions.

GLM-4.5V/4.6V mark a box as `<|begin_of_box|>[[x0, y0, x1, y1]]<|end_of_box|>` on a 0–1000 scale of the image. The
markers are special tokens of its tokenizer, so a server that decodes with `skip_special_tokens=true` (vLLM's and
SGLang's default) strips them and leaves the bare `[[x0, y0, x1, y1]]`; both forms are read. GLM's own notes say the
bracket style inside the markers may vary (`[]`, `[[]]`, `()`, `<>`): all are read there. GLM also wraps a whole
final answer in the same markers (`<|begin_of_box|>80.00<|end_of_box|>`): a box is only what looks like coordinates
(bracketed groups of four numbers), never numbers that happen to sit inside a boxed answer, and a bare box needs the
double brackets GLM writes, so a plain list of four numbers in prose is not taken for one.
"""

from __future__ import annotations

import math
import re

from vision_stage.types import Box, ImageFacts, Point

BOX_OPEN, BOX_CLOSE = "<|begin_of_box|>", "<|end_of_box|>"
_NUMBER = r"-?\d+(?:\.\d+)?"
_FOUR = rf"\s*{_NUMBER}\s*,\s*{_NUMBER}\s*,\s*{_NUMBER}\s*,\s*{_NUMBER}\s*"
_QUAD = rf"\[{_FOUR}\]"
_ANY_QUAD = rf"(?:\[{_FOUR}\]|\({_FOUR}\)|<{_FOUR}>)"
_MARKED = re.compile(re.escape(BOX_OPEN) + r"(.*?)" + re.escape(BOX_CLOSE), re.DOTALL)
_COORDINATES = re.compile(rf"\s*[\[(<]?\s*{_ANY_QUAD}(?:\s*,\s*{_ANY_QUAD})*\s*[\])>]?\s*")
"""What a box marker holds when it marks a box: groups of four numbers, each in brackets of any style GLM uses
(`[…]`, `(…)`, `<…>`), the whole optionally in brackets too."""
_BARE = re.compile(rf"\[\s*{_QUAD}(?:\s*,\s*{_QUAD})*\s*\]")
"""A bare box in text: double brackets, as GLM writes them."""
_NUMBERS = re.compile(_NUMBER)
_NUMBERS_ONLY = re.compile(rf"[\s\[\]()<>,]*{_NUMBER}(?:[\s\[\]()<>,]+{_NUMBER})*[\s\[\]()<>,]*")
"""A string of numbers and nothing else but brackets, commas and spaces."""


def extract_boxes(text: str) -> tuple[str, tuple[Box, ...]]:
    """The text with each box marker replaced by its content, and the boxes found, in order: marked coordinates and
    bare `[[x0, y0, x1, y1]]` alike (clamped to 0–1000, corners ordered). Stray markers are dropped."""
    boxes: list[Box] = []
    pieces: list[str] = []
    position = 0
    for match in _MARKED.finditer(text):
        pieces.append(_bare_boxes(text[position : match.start()], boxes))
        inner = match.group(1)
        if _COORDINATES.fullmatch(inner):
            boxes.extend(_quads(inner))
        pieces.append(inner.strip())
        position = match.end()
    pieces.append(_bare_boxes(text[position:], boxes))
    return "".join(pieces).replace(BOX_OPEN, "").replace(BOX_CLOSE, ""), tuple(boxes)


def bare_box(text: str, *, at_start: bool = False) -> Box | None:
    """The first bare `[[x0, y0, x1, y1]]` in `text` (with `at_start`, only one that begins it, after spaces)."""
    match = _BARE.match(text.lstrip()) if at_start else _BARE.search(text)
    return _quads(match.group(0))[0] if match else None


def without_bare_boxes(text: str) -> str:
    """`text` with its bare boxes taken out."""
    return _BARE.sub("", text)


def _bare_boxes(segment: str, boxes: list[Box]) -> str:
    for match in _BARE.finditer(segment):
        boxes.extend(_quads(match.group(0)))
    return segment


def _quads(text: str) -> list[Box]:
    return [_box([float(n) for n in _NUMBERS.findall(quad)]) for quad in re.findall(_ANY_QUAD, text)]


def _box(numbers: list[float]) -> Box:
    x0, y0, x1, y1 = (min(1000.0, max(0.0, n)) for n in numbers)
    return Box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


_CORNERS = (("x0", "y0", "x1", "y1"), ("xmin", "ymin", "xmax", "ymax"), ("left", "top", "right", "bottom"))
_SIZES = (("x", "y", "width", "height"), ("x", "y", "w", "h"))


def box_of(value: object) -> Box | None:
    """A box from a JSON value a model wrote for one: `[x0, y0, x1, y1]` (nested, or a string of only those numbers),
    named corners, an origin and a size, or a four-point quad (its bounding box); None for anything else, such as a
    date or a phone number that happens to hold four numbers."""
    if isinstance(value, dict):
        return _named_box({str(k).lower(): v for k, v in value.items()})
    numbers = _numbers_of(value)
    if numbers is None or len(numbers) not in (4, 8):
        return None
    if len(numbers) == 8:  # [[x, y], [x, y], [x, y], [x, y]]
        xs, ys = numbers[0::2], numbers[1::2]
        return _box([min(xs), min(ys), max(xs), max(ys)])
    return _box(numbers)


def _numbers_of(value: object) -> list[float] | None:
    """The numbers `value` is made of, when it is made of nothing else (nested lists, numbers, strings of numbers)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return [float(value)] if math.isfinite(value) else None
    if isinstance(value, str):
        return [float(n) for n in _NUMBERS.findall(value)] if _NUMBERS_ONLY.fullmatch(value) else None
    if isinstance(value, list):
        numbers: list[float] = []
        for item in value:
            found = _numbers_of(item)
            if found is None:
                return None
            numbers += found
        return numbers
    return None


def _named_box(data: dict[str, object]) -> Box | None:
    for names in _CORNERS:
        numbers = [_number(data.get(name)) for name in names]
        if all(n is not None for n in numbers):
            return _box([n for n in numbers if n is not None])
    for x, y, w, h in _SIZES:
        origin_size = [_number(data.get(name)) for name in (x, y, w, h)]
        if all(n is not None for n in origin_size):
            left, top, width, height = (n for n in origin_size if n is not None)
            return _box([left, top, left + width, top + height])
    return box_of(list(data.values())) if data else None


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    try:
        return float(value) if isinstance(value, str) else None
    except ValueError:
        return None


def quad(box: Box | None, facts: ImageFacts) -> tuple[Point, Point, Point, Point]:
    """A 0–1000 box as a pixel quadrilateral of the image, clockwise from the top left; all zeros when unknown."""
    x0, y0, x1, y1 = box.pixels(facts.width, facts.height) if box else (0.0, 0.0, 0.0, 0.0)
    return ((x0, y0), (x1, y0), (x1, y1), (x0, y1))
