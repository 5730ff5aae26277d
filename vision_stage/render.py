"""The readable description a reasoning stage reads, written from a vision model's structured description.

A pure function: the same caption and `StructuredDescription` always give the same text. Sections, in order: the
caption, the image's facts, the layout, labelled fields, objects with their boxes (GLM's 0–1000 scale), and every line
of text quoted in reading order. Empty sections are left out, except the text, whose absence is worth saying.
"""

from __future__ import annotations

from collections.abc import Sequence

from vision_stage.facts import facts_lines
from vision_stage.types import Box, DetectedObject, KeyValue, StructuredDescription, TextLine


def render_description(caption: str, structured: StructuredDescription, *, text_read: bool = True) -> str:
    """Caption, facts, layout, fields, objects and quoted text lines, one item per line. `text_read=False` (the model
    was not asked to read the text: caption and answer tasks) leaves out the text section rather than claim none."""
    lines: list[str] = []
    if caption.strip():
        lines.append(f"Caption: {caption.strip()}")
    lines.extend(facts_lines(structured.facts))
    if structured.layout:
        lines.append(f"Layout: {structured.layout}")
    lines.extend(_fields(structured.fields))
    lines.extend(_objects(structured.objects))
    if text_read:
        lines.extend(_text(structured.text_lines))
    return "\n".join(lines)


def _fields(fields: Sequence[KeyValue]) -> list[str]:
    if not fields:
        return []
    return [f"Fields ({len(fields)}):"] + [f"- {field.key}: {_quote(field.value)}" for field in fields]


def _objects(objects: Sequence[DetectedObject]) -> list[str]:
    if not objects:
        return []
    block = [f"Objects ({len(objects)}, boxes as [x0, y0, x1, y1] on a 0–1000 scale of the image):"]
    block.extend(f"- {item.label}" + (f" {_box(item.box)}" if item.box else " (no location given)") for item in objects)
    return block


def _text(text_lines: Sequence[TextLine]) -> list[str]:
    if not text_lines:
        return ["Text: none was read in the image."]
    count = "1 line" if len(text_lines) == 1 else f"{len(text_lines)} lines"
    ordered = sorted(text_lines, key=lambda line: line.order)
    return [f"Text read by the vision model ({count}, in reading order):"] + [
        f"{number}. {_quote(line.text)}" for number, line in enumerate(ordered, start=1)
    ]


def _box(box: Box) -> str:
    return "[" + ", ".join(_number(n) for n in (box.x0, box.y0, box.x1, box.y1)) + "]"


def _number(value: float) -> str:
    return f"{value:g}"


def _quote(text: str) -> str:
    return f"“{text}”"
