"""Reading a vision model's structured description in whatever shape the model wrote it. Pure functions.

`vision_stage.prompts.DESCRIBE_PROMPT` asks for one JSON object with `caption`, `text_lines`, `objects`, `fields` and
`layout`. Models answer in many shapes, and every reasonable one is read:

| part       | accepted                                                                                              |
| ---------- | ----------------------------------------------------------------------------------------------------- |
| the object | bare, in a code fence, inside prose, wrapped in one outer key, the first of a list, repaired when cut |
|            | off or written loosely (`stage_protocol.model_text.find_json`)                                          |
| keys       | any case, spaces or dashes for underscores, English synonyms and Chinese names (`SECTIONS`)           |
| caption    | a string, or anything else flattened to text                                                          |
| text lines | strings (several lines split), objects with `text`/`content`/`line` and an optional box, `[text,     |
|            | box]` pairs, one multi-line string                                                                    |
| objects    | strings, objects with `label`/`name`/`type` (other attributes kept in the label), `{label: box}`      |
| fields     | an object (`{"total": "80.00"}`, nesting flattened to "merchant name"), a list of objects             |
|            | (`key`/`name`/`label` with `value`/`text`), of `[key, value]` pairs, or of "key: value" strings;      |
|            | line items (`{"name": "Latte", "price": "18.00"}`) become "Latte: price: 18.00"                       |
| other keys | kept as fields, flattened the same way                                                                |
| boxes      | `[x0, y0, x1, y1]`, nested, in a string, `{x0, y0, x1, y1}`, `{x, y, width, height}`, a 4-point quad  |

Nothing is an error: text with no usable JSON (Markdown, prose) becomes the description as the model wrote it, with a
note saying so, and what can be read from it is added as evidence: Markdown tables and "key: value" lines as fields,
quoted text as text lines, lines under a "Text"/"Objects" heading as lines or objects, "Caption:" as the caption.
Text the model wrote around its JSON is kept too. So the reasoning stage and the arbiter always get what the model saw.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from stage_protocol.model_text import find_json
from vision_stage.boxes import box_of, quad
from vision_stage.facts import facts_lines
from vision_stage.prose import read_prose
from vision_stage.render import render_description
from vision_stage.types import Box, DetectedObject, ImageFacts, KeyValue, Reading, StructuredDescription, TextLine

SECTIONS: dict[str, tuple[str, ...]] = {
    "caption": ("caption", "description", "summary", "overview", "scene", "imagedescription", "描述", "图片描述",
                "图像描述", "摘要", "概述", "概括", "说明", "标题描述", "场景"),
    "text_lines": ("textlines", "text", "texts", "lines", "ocr", "ocrtext", "ocrresults", "textcontent", "readtext",
                   "文字", "文本", "文本行", "文字内容", "文本内容", "识别文字", "ocr结果"),
    "objects": ("objects", "object", "entities", "elements", "detections", "people", "物体", "对象", "目标", "元素",
                "物品", "主要物体"),
    "fields": ("fields", "keyvalues", "keyvaluepairs", "kv", "kvpairs", "attributes", "properties", "information",
               "info", "字段", "键值", "键值对", "信息", "关键信息", "属性"),
    "layout": ("layout", "structure", "arrangement", "布局", "版式", "结构", "排版"),
}  # fmt: skip
"""Each part of the description and the keys (normalised by `_norm`) that name it."""
_SECTION_OF = {name: section for section, names in SECTIONS.items() for name in names}
TEXT_KEYS = ("text", "content", "line", "value", "words", "string", "ocr", "文本", "内容", "文字", "值")
BOX_KEYS = ("box", "bbox", "bbox2d", "box2d", "boundingbox", "position", "coordinates", "coords", "location", "rect",
            "region", "坐标", "位置", "框")  # fmt: skip
LABEL_KEYS = ("label", "name", "object", "type", "class", "category", "标签", "名称", "类别", "物体", "对象")
KEY_KEYS = ("key", "name", "label", "field", "title", "item", "键", "字段", "名称", "项目", "项")
VALUE_KEYS = ("value", "text", "val", "content", "amount", "值", "内容", "数值", "金额")
NOT_JSON_NOTE = "the model's description was not usable JSON: its own text is passed on as it wrote it"
PROSE_HEADER = "Description written by the model (not in the requested JSON form):"
REMARKS_HEADER = "Also written by the model, outside its JSON:"
REPAIRED_NOTE = "the model's JSON description did not parse as written and was repaired to be read"


@dataclass
class _Parts:
    caption: str = ""
    lines: list[tuple[str, Box | None]] = field(default_factory=list)
    objects: list[DetectedObject] = field(default_factory=list)
    fields: list[KeyValue] = field(default_factory=list)
    layout: str = ""

    def structured(self, facts: ImageFacts) -> StructuredDescription:
        lines = tuple(TextLine(text, quad(box, facts), 1.0, order) for order, (text, box) in enumerate(self.lines))
        return StructuredDescription(
            facts, lines, (), (), tuple(self.objects), tuple(self.fields), self.layout.strip() or None
        )


def read_description(text: str, facts: ImageFacts) -> Reading:
    """The description in `text` (box markup already replaced by its content), never failing (module docstring)."""
    found = find_json(text, kinds=(dict,), parse_float=str) or find_json(text, kinds=(list,), parse_float=str)
    parts = _json_parts(found.value) if found is not None else None
    if found is None or parts is None:
        return _prose(text, facts)
    structured = parts.structured(facts)
    rendered = render_description(parts.caption, structured)
    remarks = found.outside(text)
    if len(remarks) >= 12:  # more than a "Here you go:"
        rendered += f"\n{REMARKS_HEADER}\n{remarks}"
    notes = (REPAIRED_NOTE,) if found.repaired else ()
    return Reading(parts.caption, rendered, structured, None, None, (), notes)


def _norm(key: object) -> str:
    return re.sub(r"[\s_\-:：]+", "", str(key)).lower()


def _json_parts(value: object) -> _Parts | None:
    """The parts of a JSON value, or None when it holds no description (a list of numbers, say)."""
    if isinstance(value, list):
        described = [item for item in value if isinstance(item, dict) and _sections_in(item) and not _is_line(item)]
        if described:
            return _dict_parts(described[0])
        parts = _Parts()
        _list_entries(value, parts)
        return parts if parts.lines or parts.fields or parts.objects else None
    if isinstance(value, dict):
        return _dict_parts(_unwrapped(value))
    return None


def _is_line(data: dict[str, object]) -> bool:
    """Whether `data` is one line of text (`{"text": "…", "box": …}`) rather than a description."""
    return isinstance(_first(data, TEXT_KEYS[:3]), str)


def _sections_in(data: dict[str, object]) -> bool:
    return any(_norm(key) in _SECTION_OF for key in data)


def _unwrapped(data: dict[str, object]) -> dict[str, object]:
    """The object inside a lone outer key (`{"image_description": {...}}`), up to three levels down."""
    for _ in range(3):
        inner = next(iter(data.values())) if len(data) == 1 else None
        if not isinstance(inner, dict) or not _sections_in(inner):
            break
        data = inner
    return data


def _dict_parts(data: dict[str, object]) -> _Parts:
    parts = _Parts()
    for key, value in data.items():
        section = _SECTION_OF.get(_norm(key))
        if section == "caption" and not parts.caption and isinstance(value, str | dict | list):
            parts.caption = _flat_text(value)
        elif section == "text_lines":
            parts.lines += _lines(value)
        elif section == "objects":
            parts.objects += _objects(value)
        elif section == "layout" and not parts.layout:
            parts.layout = _flat_text(value)
        elif section == "fields":
            parts.fields += _fields("", value)
        else:
            parts.fields += _fields(str(key), value)
    return parts


def _list_entries(items: list[object], parts: _Parts) -> None:
    """A top-level list: each entry read as a line, a field or an object by its shape."""
    for item in items:
        if box_of(item) is not None and not isinstance(item, dict | str):
            continue  # a bare box, or other numbers: no reading of the image's content
        if isinstance(item, dict) and _first(item, TEXT_KEYS[:3]) is not None:
            parts.lines += _lines([item])
        elif isinstance(item, dict) and _first(item, LABEL_KEYS) is not None and _first(item, BOX_KEYS) is not None:
            parts.objects += _objects([item])
        elif isinstance(item, dict | list):
            parts.fields += _fields("", [item])
        elif isinstance(item, str):
            parts.lines += _lines(item)


def _pick(data: dict[str, object], keys: tuple[str, ...]) -> tuple[str, object] | None:
    """The key and value of the first of `keys` (normalised) present and not null in `data`."""
    by_norm = {_norm(key): (key, value) for key, value in data.items() if value is not None}
    return next((by_norm[key] for key in keys if key in by_norm), None)


def _first(data: dict[str, object], keys: tuple[str, ...]) -> object | None:
    """The value of the first of `keys` (normalised) present and not null in `data`."""
    picked = _pick(data, keys)
    return picked[1] if picked else None


def _rest(data: dict[str, object], used: set[str]) -> dict[str, object]:
    """`data` without the keys `used` and without empty values: the attributes still to keep."""
    return {key: value for key, value in data.items() if key not in used and value not in (None, "", [], {})}


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).strip()


def _flat_text(value: object) -> str:
    """Any JSON value as one line of text: strings as they are, objects as "key: value" pairs."""
    if isinstance(value, dict):
        return "; ".join(f"{key}: {_flat_text(item)}" for key, item in value.items() if item not in (None, "", []))
    if isinstance(value, list):
        return "; ".join(_flat_text(item) for item in value if item not in (None, "", []))
    return "" if value is None else _scalar(value)


def _lines(value: object) -> list[tuple[str, Box | None]]:
    if isinstance(value, str):
        return [(line.strip(), None) for line in value.splitlines() if line.strip()]
    if isinstance(value, dict):
        text = _first(value, TEXT_KEYS)
        if text is None:  # {"line 1": "…", "line 2": "…"}
            return [line for item in value.values() for line in _lines(item)]
        return [(line, _box_value(value)) for line, _ in _lines(_flat_text(text))]
    if isinstance(value, list):
        if value and isinstance(value[0], str) and len(value) == 2 and not isinstance(value[1], str):
            return [(value[0].strip(), box_of(value[1]))]  # [text, box]
        if len(value) == 2 and isinstance(value[0], list) and isinstance(value[1], str) and box_of(value[0]):
            return [(value[1].strip(), box_of(value[0]))]  # [box, text]
        return [line for item in value for line in _lines(item)]
    return [] if value is None else [(_scalar(value), None)]


def _box_value(data: dict[str, object]) -> Box | None:
    box = _first(data, BOX_KEYS)
    return box_of(box) if box is not None else None


def _objects(value: object) -> list[DetectedObject]:
    if isinstance(value, str):
        return [DetectedObject(label.strip()) for label in re.split(r"[,;，；、\n]", value) if label.strip()]
    if isinstance(value, list):
        if len(value) == 2 and isinstance(value[0], str) and box_of(value[1]) is not None:
            return [DetectedObject(value[0].strip(), box_of(value[1]))]
        return [found for item in value for found in _objects(item)]
    if isinstance(value, dict):
        label = _pick(value, LABEL_KEYS)
        if label is None:  # {"cup": [box], "people": 2}
            return [_named_object(str(key), item) for key, item in value.items()]
        where = _pick(value, BOX_KEYS)
        box = box_of(where[1]) if where else None
        rest = _rest(value, {label[0]} | ({where[0]} if where and box else set()))
        extra = f" ({_flat_text(rest)})" if rest else ""
        return [DetectedObject(f"{_flat_text(label[1])}{extra}", box)]
    return [] if value is None else [DetectedObject(_scalar(value))]


def _named_object(label: str, value: object) -> DetectedObject:
    box = box_of(value)
    return DetectedObject(label, box) if box is not None else DetectedObject(f"{label} ({_flat_text(value)})")


def _fields(prefix: str, value: object) -> list[KeyValue]:
    """`value` as fields under `prefix` (module docstring)."""
    if value is None or value in ("", [], {}):
        return []
    if isinstance(value, str | int | float | bool):
        return [_pair_of_text(_scalar(value))] if not prefix else [KeyValue(prefix, _scalar(value))]
    if isinstance(value, list):
        if all(isinstance(item, str | int | float | bool) for item in value) and prefix:
            return [KeyValue(prefix, "; ".join(_scalar(item) for item in value))]
        return [kv for item in value for kv in _entry(prefix, item)]
    assert isinstance(value, dict)
    return [kv for key, item in value.items() for kv in _fields(_joined(prefix, str(key)), item)]


def _entry(prefix: str, item: object) -> list[KeyValue]:
    """One entry of a list of fields: a pair, a `{key, value}` object, a line item, or anything else flattened."""
    if isinstance(item, list) and len(item) == 2 and isinstance(item[0], str | int | float):
        return [KeyValue(_joined(prefix, _scalar(item[0])), _flat_text(item[1]))]
    if not isinstance(item, dict):
        return _fields(prefix, item)
    key, value = _pick(item, KEY_KEYS), _pick(item, VALUE_KEYS)
    if key is not None and value is not None and key[0] != value[0]:
        rest = _rest(item, {key[0], value[0]})
        extra = f" ({_flat_text(rest)})" if rest else ""
        return [KeyValue(_joined(prefix, _flat_text(key[1])), _flat_text(value[1]) + extra)]
    if key is not None:  # a line item: its name, then its other attributes
        rest = _rest(item, {key[0]})
        return [KeyValue(_joined(prefix, _flat_text(key[1])), _flat_text(rest))] if rest else _fields(prefix, key[1])
    return _fields(prefix, item)


def _joined(prefix: str, key: str) -> str:
    return f"{prefix} {key}".strip() if prefix else key.strip()


def _pair_of_text(text: str) -> KeyValue:
    """ "Total: 80.00" as a field; text with no colon is a field of its own words, with no value."""
    match = re.match(r"\s*([^:：]{1,80}?)\s*[:：]\s*(.+)", text, re.DOTALL)
    return KeyValue(match.group(1), match.group(2).strip()) if match else KeyValue(text.strip(), "")


def _prose(text: str, facts: ImageFacts) -> Reading:
    """A description with no usable JSON: the model's text as it wrote it, after the image's facts, and the
    evidence `vision_stage.prose` reads from it."""
    found = read_prose(text)
    parts = _Parts(found.caption, found.lines, found.objects, found.fields, found.layout)
    body = "\n".join([*facts_lines(facts), PROSE_HEADER])
    return Reading(parts.caption, f"{body}\n{text.strip()}", parts.structured(facts), None, None, (), (NOT_JSON_NOTE,))


def written_text(description: str) -> str | None:
    """The model's own text of a description that was not JSON (what `_prose` put after its header), else None."""
    _, header, text = description.partition(f"{PROSE_HEADER}\n")
    return text if header else None


def remarks(description: str) -> str | None:
    """What the model wrote around its JSON (what `read_description` put after its header), else None."""
    _, header, text = description.partition(f"\n{REMARKS_HEADER}\n")
    return text if header else None
