"""`response_format: "json"`: reading the reasoning stage's JSON answer into fields, and the fields into claims. Pure.

`parse_fields(text)` finds the JSON object in an answer with the same reader as the vision stage's descriptions
(`stage_protocol.model_text.find_json`: inside a code fence, with text around it, loosely written or cut off) and
keeps its flat fields (key → string, number, boolean or null) and an optional `items` list (of such flat objects, or
plain values); other nested values are dropped. None when there is no JSON object.
`serialise(fields)` is the compact JSON the response's `answer` carries (`ensure_ascii=False`).

`field_claims(fields, language)` makes the fields checkable like any other answer: each field is read as the line
"key: value", so the claim extractor sees a referent and a value ("total: 54.06" → a number about the total,
"date: 2026-03-14" → a date); a string field with no such claim is a quote of what the image reads ("merchant" →
“BLUE BOTTLE CAFE”). An item's fields are read after the item's name ("Latte price: 18.00"), so the line of the
image naming the item is the referent line.
"""

from __future__ import annotations

import json
from typing import Literal

from orchestrator.analysis.messages import Language
from orchestrator.arbitration.claims import Claim, extract_claims
from stage_protocol.model_text import find_json

ResponseFormat = Literal["text", "json"]
Scalar = str | int | float | bool | None
Fields = dict[str, object]
"""Flat key → `Scalar`, plus `items`: a list of flat objects or scalars."""

_NAME_KEYS = ("name", "item", "description", "名称", "商品", "品名")


def parse_fields(text: str) -> Fields | None:
    """The answer's fields (module docstring), or None when it holds no JSON object, even repaired."""
    found = find_json(text, kinds=(dict,))
    return _flat(found.value) if found is not None and isinstance(found.value, dict) else None


def _flat(data: dict[str, object]) -> Fields:
    fields: Fields = {}
    for key, value in data.items():
        if _is_scalar(value):
            fields[key] = value
        elif key == "items" and isinstance(value, list):
            fields[key] = [_flat_item(item) for item in value if _is_scalar(item) or isinstance(item, dict)]
    return fields


def _flat_item(item: object) -> object:
    if isinstance(item, dict):
        return {str(key): value for key, value in item.items() if _is_scalar(value)}
    return item


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def serialise(fields: Fields) -> str:
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))


def field_claims(fields: Fields, language: Language) -> tuple[Claim, ...]:
    """The claims the fields make about the image (module docstring), in field order."""
    claims: list[Claim] = []
    for key, value in fields.items():
        if key == "items" and isinstance(value, list):
            for item in value:
                claims += _item_claims(item, language)
        elif _is_scalar(value):
            claims += _line_claims(key, value, language)
    return tuple(claims)


def _item_claims(item: object, language: Language) -> list[Claim]:
    if not isinstance(item, dict):
        return _line_claims("", item, language)
    name = next((str(item[key]) for key in _NAME_KEYS if isinstance(item.get(key), str)), "")
    claims = [_quote(key, value) for key, value in item.items() if value == name and name]
    for key, value in item.items():
        if value != name:
            claims += _line_claims(f"{name} {key}".strip(), value, language)
    return claims


def _line_claims(key: str, value: object, language: Language) -> list[Claim]:
    if value is None or isinstance(value, bool) or str(value).strip() == "":
        return []
    text = str(value).strip()
    found = list(extract_claims(f"{key}: {text}" if key else text, language))
    if not found and isinstance(value, str) and len(text) >= 2:
        found.append(_quote(key, text))
    return found


def _quote(key: str, value: object) -> Claim:
    text = str(value).strip()
    return Claim("quote", f"{key}: “{text}”" if key else f"“{text}”", text)


def answer_claims(text: str, language: Language) -> tuple[Claim, ...]:
    """The claims of a JSON answer: its fields' when it parses, else the prose extractor's."""
    fields = parse_fields(text)
    return field_claims(fields, language) if fields is not None else extract_claims(text, language)
