"""Evidence read from a description a model wrote in Markdown or prose instead of JSON. Pure functions.

The text itself is always passed on whole (`vision_stage.description`); this adds what can be read from it as
structured evidence for the arbiter:

- Markdown tables: two columns are key and value; more columns make a field per row, named by its first cell, whose
  value names each other cell by its header ("Latte": "Qty: 2, Price: 36.00");
- "key: value" lines, bulleted or numbered or not, bold keys too (`- **Total**: 80.00`, `总计：80.00`); a "Caption"
  or "Layout" key fills that part;
- under a heading (Markdown `#`, or a bold or colon-ended line) naming text, objects or fields, the items below as
  lines of text, objects or fields;
- quoted text (“…”, "…", 「…」, «…») as lines of text the model read; a bare `[[x0, y0, x1, y1]]` on the same line
  is its box.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from vision_stage.boxes import bare_box, without_bare_boxes
from vision_stage.types import Box, DetectedObject, KeyValue

_BULLET = re.compile(r"^\s*(?:[-*+•·]|\d{1,3}[.)、])\s+")
_HEADING = re.compile(r"^\s*(?:#{1,6}\s*(.+?)\s*#*|\*\*(.+?)\*\*\s*[:：]?|([^:：]{1,40})[:：])\s*$")
_PAIR = re.compile(r"^\s*(?:\*\*|__)?([^:：|\[\]]{1,60}?)(?:\*\*|__)?\s*[:：]\s*(.+?)\s*$")
_QUOTED = re.compile(
    r"“([^”\n]{2,200})”|\"([^\"\n]{2,200})\"|「([^」\n]{2,200})」|«([^»\n]{2,200})»|『([^』\n]{2,200})』"
)
_SEPARATOR = re.compile(r"^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$")
_EMPHASIS = re.compile(r"\*\*|__|`")
_SECTION_WORDS = {
    "text": ("text", "texts", "text lines", "lines", "ocr", "visible text", "文字", "文本", "文本行", "识别文字"),
    "objects": ("objects", "object", "people", "items in the image", "物体", "对象", "主要物体", "物品"),
    "fields": ("fields", "key values", "key-value pairs", "details", "information", "字段", "信息", "关键信息"),
    "caption": ("caption", "description", "summary", "描述", "摘要", "概述"),
    "layout": ("layout", "structure", "布局", "版式", "结构"),
}
_SECTION_OF = {word: section for section, words in _SECTION_WORDS.items() for word in words}


@dataclass
class ProseEvidence:
    """What could be read from the text; `lines` are (text, box or None)."""

    caption: str = ""
    layout: str = ""
    lines: list[tuple[str, Box | None]] = field(default_factory=list)
    objects: list[DetectedObject] = field(default_factory=list)
    fields: list[KeyValue] = field(default_factory=list)


def read_prose(text: str) -> ProseEvidence:
    """The evidence in `text` (module docstring)."""
    found = ProseEvidence()
    section = ""
    table: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            _table(table, found)
            table = []
        if not line:
            continue
        heading = _section_heading(line)
        if heading is not None:
            section = heading
            continue
        _line(line, section, found)
    if table:
        _table(table, found)
    if not found.caption:
        found.caption = _first_sentence(text)
    return found


def _section_heading(line: str) -> str | None:
    match = _HEADING.match(line)
    if match is None:
        return None
    words = _plain(next(group for group in match.groups() if group)).lower().rstrip(":： ")
    return _SECTION_OF.get(words, "other" if line.lstrip().startswith("#") else None)


def _line(line: str, section: str, found: ProseEvidence) -> None:
    marked = _plain(_BULLET.sub("", line)).strip()
    box = bare_box(marked)
    item = re.sub(r"\s{2,}", " ", without_bare_boxes(marked)).strip()
    quotes = _quotes(marked)
    found.lines.extend(quotes)
    pair = _PAIR.match(item)
    if pair is not None and not quotes:
        key, value = pair.group(1).strip(), pair.group(2).strip()
        part = _SECTION_OF.get(key.lower())
        if part == "caption" and not found.caption:
            found.caption = value
        elif part == "layout" and not found.layout:
            found.layout = value
        else:
            found.fields.append(KeyValue(key, value))
    elif section == "text" and not quotes and item:
        found.lines.append((item, box))
    elif section == "objects" and item:
        found.objects.append(DetectedObject(item))
    elif section == "fields" and item and not quotes:
        found.fields.append(KeyValue(item, ""))


def _table(raw_rows: list[str], found: ProseEvidence) -> None:
    rows = [[_plain(cell).strip() for cell in row.strip().strip("|").split("|")] for row in raw_rows]
    header: list[str] | None = None
    if len(raw_rows) >= 2 and _SEPARATOR.match(raw_rows[1]):
        header, rows = rows[0], rows[2:]
    for cells in rows:
        if not any(cells) or _SEPARATOR.match("|".join(cells)):
            continue
        if len(cells) == 1:
            found.lines.append((cells[0], None))
        elif len(cells) == 2:
            found.fields.append(KeyValue(cells[0], cells[1]))
        else:
            names = header[1:] if header and len(header) == len(cells) else [""] * (len(cells) - 1)
            value = ", ".join(f"{name}: {cell}" if name else cell for name, cell in zip(names, cells[1:], strict=True))
            found.fields.append(KeyValue(cells[0], value))


def _quotes(line: str) -> list[tuple[str, Box | None]]:
    """Each quoted text in `line`, with the bare box written right after it, if any."""
    found = []
    for match in _QUOTED.finditer(line):
        quote = next(group for group in match.groups() if group).strip()
        found.append((quote, bare_box(line[match.end() :], at_start=True)))
    return found


def _plain(text: str) -> str:
    return _EMPHASIS.sub("", text)


def _first_sentence(text: str) -> str:
    """The first sentence of the first line of prose (not a table, heading, bullet or pair)."""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("|", "#", "```", "{", "[")) or _BULLET.match(line) or _PAIR.match(line):
            continue
        sentence = re.split(r"(?<=[.!?。！？])\s", without_bare_boxes(_plain(line)), maxsplit=1)[0]
        sentence = re.sub(r"\s+(?=[.,;:!?])|(?<=\s)\s+", "", sentence).strip()
        return sentence[:300]
    return ""
