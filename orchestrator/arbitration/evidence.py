"""The evidence a reasoning answer's claims are checked against, gathered from what the vision stage saw. Pure.

`evidence_from_vision(result)`: text rows (OCR lines on one row joined, so "TOTAL" and "54.06" read as one row),
key-value fields, detected objects, tags, and — for backends other than `ocr`, whose caption and description are
composed from the same rows — the sentences of the caption, answer and description. Strings are compared
*compacted* (`compact`): NFKC (full-width → half-width), case-folded, without whitespace or punctuation, because OCR
drops spaces ("BLUEBOTTLECAFE"). `orchestrator.arbitration.verification` gives each claim its verdict against it.

`evidence_from_vision(result, witness=lines)` also keeps a second reader's text (the OCR witness,
`orchestrator.arbitration.witness`) as rows of their own, source `witness` ("witness line 5"), apart from the vision
stage's `items`: they are only ever weighed against the vision stage's reading of the same thing, never as its
evidence.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from vision_stage.types import Point, TextLine, VisionResult, text_rows

EvidenceSource = Literal["text", "field", "object", "tag", "caption", "answer", "description", "probe", "witness"]


_PUNCTUATION = re.compile(r"[\W_]+", re.UNICODE)

Quad = tuple[Point, Point, Point, Point]


@dataclass(frozen=True)
class EvidenceItem:
    """One piece of what the vision stage saw: `where` says where ("line 8", "field “Total”", "caption")."""

    source: EvidenceSource
    text: str
    where: str
    score: float | None = None
    boxes: tuple[Quad, ...] = ()
    """The boxes, in the image's pixels, of the text lines a row was read from (none for anything else): what the
    web page highlights on the image."""


@dataclass(frozen=True)
class Evidence:
    """What claims are checked against; `lists_objects` says whether absence from `objects` means anything;
    `witness` is the second reader's rows (empty without one)."""

    backend: str
    items: tuple[EvidenceItem, ...]
    objects: tuple[str, ...] = ()
    tags: tuple[EvidenceItem, ...] = ()
    lists_objects: bool = False
    witness: tuple[EvidenceItem, ...] = ()


def compact(text: str) -> str:
    """NFKC, case-folded, without whitespace or punctuation: how strings are compared."""
    return _PUNCTUATION.sub("", unicodedata.normalize("NFKC", text).casefold())


def evidence_from_vision(result: VisionResult, witness: Sequence[TextLine] = ()) -> Evidence:
    """The vision stage's evidence; `witness`, the lines a second reader read in the same image."""
    structured = result.structured
    items = list(_rows(structured.text_lines))
    items += [EvidenceItem("field", f"{kv.key}: {kv.value}", f"field “{kv.key}”") for kv in structured.fields]
    if result.backend != "ocr":
        said: tuple[tuple[EvidenceSource, str | None], ...] = (
            ("caption", result.caption),
            ("answer", result.answer),
            ("description", result.description),
        )
        items += [
            EvidenceItem(source, sentence, source) for source, text in said for sentence in _sentences(text or "")
        ]
    tags = tuple(EvidenceItem("tag", tag.label, "tag", tag.score) for tag in structured.tags)
    objects = tuple(item.label for item in structured.objects)
    witnessed = tuple(_rows(witness, "witness", "witness line "))
    return Evidence(result.backend, tuple(items), objects, tags, lists_objects=bool(objects), witness=witnessed)


def _rows(lines: Sequence[TextLine], source: EvidenceSource = "text", where: str = "line ") -> list[EvidenceItem]:
    """Lines in reading order, joined when their boxes share a row (`vision_stage.types.text_rows`)."""
    return [
        EvidenceItem(
            source,
            " ".join(line.text for line in row),
            f"{where}{row[0].order + 1}",
            min(line.score for line in row),
            tuple(line.box for line in row),
        )
        for row in text_rows(lines)
    ]


def _sentences(text: str) -> list[str]:
    return [part.strip() for part in re.split(r"(?<=[.!?。！？；;])\s*|\n+", text) if part.strip()]
