"""Parsing what a vision-language model writes: `<think>` blocks, `<|begin_of_box|>` grounding boxes, and the JSON
structured description asked for by `vision_stage.prompts.DESCRIBE_PROMPT`. Pure functions.

The same module writes that JSON (`description_json`), so a backend that is not a language model (the `ocr` stage
server) can answer the describe task in the shape a GLM model would.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from vision_stage.errors import VisionInvalidOutput
from vision_stage.render import render_description
from vision_stage.types import (
    Box,
    DetectedObject,
    ImageFacts,
    KeyValue,
    Point,
    StructuredDescription,
    TextLine,
    VisionResult,
    VisionTask,
)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
BOX_OPEN, BOX_CLOSE = "<|begin_of_box|>", "<|end_of_box|>"
_BOX = re.compile(re.escape(BOX_OPEN) + r"(.*?)" + re.escape(BOX_CLOSE), re.DOTALL)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")
_MAX_STARTS = 64


def split_thinking(text: str) -> tuple[str | None, str]:
    """(thinking, answer). Handles `<think>…</think>answer`, a missing opening tag (the chat template may have put it
    in the prompt), and an unterminated block (thinking cut by the token limit: no answer)."""
    if THINK_CLOSE in text:
        head, _, answer = text.partition(THINK_CLOSE)
        thinking = head.split(THINK_OPEN, 1)[-1].strip()
        return thinking or None, answer.strip()
    if text.lstrip().startswith(THINK_OPEN):
        return text.lstrip()[len(THINK_OPEN) :].strip() or None, ""
    return None, text.strip()


def extract_boxes(text: str) -> tuple[str, tuple[Box, ...]]:
    """The text with each `<|begin_of_box|>…<|end_of_box|>` replaced by its plain content, and the boxes found in
    them (every 4 numbers make a box, clamped to 0–1000). Box markup with no numbers keeps its text and adds none."""
    boxes: list[Box] = []

    def plain(match: re.Match[str]) -> str:
        inner = match.group(1)
        numbers = [float(n) for n in _NUMBER.findall(inner)]
        boxes.extend(_box(numbers[i : i + 4]) for i in range(0, len(numbers) - len(numbers) % 4, 4))
        return inner.strip()

    return _BOX.sub(plain, text).replace(BOX_OPEN, "").replace(BOX_CLOSE, ""), tuple(boxes)


def _box(numbers: list[float]) -> Box:
    x0, y0, x1, y1 = (min(1000.0, max(0.0, n)) for n in numbers)
    return Box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


@dataclass(frozen=True)
class Reading:
    """What a vision-language model's text says, per task: the fields of a `VisionResult` that come from it."""

    caption: str
    description: str
    structured: StructuredDescription
    answer: str | None
    thinking: str | None
    boxes: tuple[Box, ...]

    def result(
        self, backend: str, model: str, task: VisionTask, *, started: float, notes: tuple[str, ...] = ()
    ) -> VisionResult:
        """The `VisionResult` of this reading; `started` is the request's `time.perf_counter()` at its start."""
        return VisionResult(
            backend=backend,
            model=model,
            task=task,
            caption=self.caption,
            description=self.description,
            structured=self.structured,
            answer=self.answer,
            latency_ms=(time.perf_counter() - started) * 1000,
            notes=notes,
            thinking=self.thinking,
            boxes=self.boxes,
        )


def read_output(task: VisionTask, text: str, facts: ImageFacts, *, who: str, budget_spent: bool = False) -> Reading:
    """Interpret a model's text for `task`; `who` names the model in errors. `VisionInvalidOutput` when there is no
    answer (`budget_spent`: the token limit was reached, so thinking may have been cut) or no usable JSON description.
    The answer task has no caption; the caption and answer tasks have no structured evidence beyond `facts`."""
    thinking, answer = split_thinking(text)
    if not answer:
        if thinking is not None and budget_spent:
            raise VisionInvalidOutput(
                f"{who} spent its whole token budget thinking and wrote no answer; raise "
                "ORCH_VISION__MAX_NEW_TOKENS or turn thinking off (ORCH_VISION__THINKING=false)"
            )
        raise VisionInvalidOutput(f"{who} wrote no answer for the {task} task")
    plain, boxes = extract_boxes(answer)
    if task == "describe":
        try:
            caption, structured = parse_description(answer, facts)
        except VisionInvalidOutput as exc:
            raise VisionInvalidOutput(f"{who}: {exc}") from exc
        return Reading(caption, render_description(caption, structured), structured, None, thinking, boxes)
    structured = StructuredDescription(facts)
    caption = plain.strip() if task == "caption" else ""
    answer_text = plain.strip() if task == "answer" else None
    description = render_description(caption, structured, text_read=False)
    return Reading(caption, description, structured, answer_text, thinking, boxes)


def parse_description(text: str, facts: ImageFacts) -> tuple[str, StructuredDescription]:
    """(caption, structured) from the model's JSON description; `VisionInvalidOutput` when no usable JSON object is
    in `text`. Tolerates code fences, text around the object, box markup inside it, and missing keys."""
    data = _json_object(extract_boxes(text)[0])
    try:
        lines = tuple(_text_line(item, order, facts) for order, item in enumerate(_items(data, "text_lines")))
        objects = tuple(_object(item) for item in _items(data, "objects"))
        fields = tuple(_field(item) for item in _items(data, "fields"))
    except (TypeError, ValueError, KeyError) as exc:
        raise VisionInvalidOutput(f"the model's JSON description has a malformed entry: {exc}") from None
    caption = str(data.get("caption") or "").strip()
    layout = str(data.get("layout") or "").strip() or None
    structured = StructuredDescription(facts, lines, (), (), objects, fields, layout)
    return caption, structured


def _json_object(text: str) -> dict[str, Any]:
    """The first JSON object in `text`, trying each `{` in turn (up to `_MAX_STARTS`): prose before the object may
    hold braces of its own."""
    candidate = _FENCE.sub("", text.strip())
    starts = [i for i, char in enumerate(candidate) if char == "{"][:_MAX_STARTS]
    if not starts:
        raise VisionInvalidOutput(f"the model did not write a JSON object; it wrote: {_clip(text)}")
    decoder, error = json.JSONDecoder(), None
    for start in starts:
        try:
            data, _ = decoder.raw_decode(candidate[start:])
        except json.JSONDecodeError as exc:
            error = error or exc
            continue
        return dict(data)  # decoding from a `{` gives an object or fails
    message = error.msg if error else "no object"
    raise VisionInvalidOutput(f"the model's JSON description does not parse ({message}): {_clip(text)}")


def _items(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key) or []
    if not isinstance(value, list):
        raise VisionInvalidOutput(f"the model's JSON description has {key!r} that is not a list")
    return value


def _text_line(item: Any, order: int, facts: ImageFacts) -> TextLine:
    if isinstance(item, str):
        return TextLine(item, _quad(None, facts), 1.0, order)
    _require_object(item)
    box = _box_of(item.get("box"))
    return TextLine(str(item["text"]), _quad(box, facts), 1.0, order)


def _object(item: Any) -> DetectedObject:
    if isinstance(item, str):
        return DetectedObject(item)
    _require_object(item)
    return DetectedObject(str(item["label"]), _box_of(item.get("box")))


def _field(item: Any) -> KeyValue:
    _require_object(item)
    return KeyValue(str(item["key"]), str(item["value"]))


def _require_object(item: Any) -> None:
    if not isinstance(item, dict):
        raise TypeError(f"expected an object, got {type(item).__name__} {item!r}")


def _box_of(value: Any) -> Box | None:
    if value is None:
        return None
    numbers = [float(n) for n in _NUMBER.findall(json.dumps(value))]
    return _box(numbers[:4]) if len(numbers) >= 4 else None


def _quad(box: Box | None, facts: ImageFacts) -> tuple[Point, Point, Point, Point]:
    x0, y0, x1, y1 = box.pixels(facts.width, facts.height) if box else (0.0, 0.0, 0.0, 0.0)
    return ((x0, y0), (x1, y0), (x1, y1), (x0, y1))


def description_json(caption: str, structured: StructuredDescription) -> str:
    """The JSON object `DESCRIBE_PROMPT` asks for, written from a structured description (boxes back on 0–1000)."""
    facts = structured.facts
    data = {
        "caption": caption,
        "text_lines": [{"text": line.text, "box": _scaled(line, facts)} for line in structured.text_lines],
        "objects": [{"label": o.label, "box": _coords(o.box)} for o in structured.objects]
        + [{"label": tag.label, "box": None} for tag in structured.tags],
        "fields": [{"key": f.key, "value": f.value} for f in structured.fields],
        "layout": structured.layout or "",
    }
    return json.dumps(data, ensure_ascii=False)


def _scaled(line: TextLine, facts: ImageFacts) -> list[float] | None:
    xs, ys = [p[0] for p in line.box], [p[1] for p in line.box]
    if facts.width <= 0 or facts.height <= 0 or max(xs) <= 0:
        return None
    scale_x, scale_y = 1000 / facts.width, 1000 / facts.height
    return [round(min(xs) * scale_x), round(min(ys) * scale_y), round(max(xs) * scale_x), round(max(ys) * scale_y)]


def _coords(box: Box | None) -> list[float] | None:
    return [box.x0, box.y0, box.x1, box.y1] if box else None


def _clip(text: str, limit: int = 200) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")
