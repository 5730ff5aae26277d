"""The cases an evaluation asks: a question about an image, and the answers that count as right.

Two sources, one type (`Case`):

- `default_set(seed)`: generated here with Pillow, nothing downloaded. For each category in `CATEGORIES` and each
  language (en, zh), `per_category` images, each with two or three questions: at least one read off the image
  (`perception`, expected route `vision_only`) and one that needs a step of thought (`reasoning`, expected route
  `vision_then_reasoning`). The values drawn come from `random.Random`, seeded per image from `seed`, so a seed
  gives the same cases and byte-identical PNGs on a machine with the same fonts; the answers are computed from the
  values drawn (`documents`, `pictures`). Chinese images need a CJK font (`canvas.CJK_FONTS`; Debian:
  `fonts-wqy-microhei`): without one the Chinese cases are left out, with one warning.
- `load_folder(path)`: a user's folder, `path/cases.jsonl` and the images it names. One JSON object per line;
  blank lines and lines starting with `#` are skipped::

      {"id": "lunch-total", "image": "images/lunch.png", "question": "What is the total?", "answers": ["54.06"],
       "language": "en", "category": "receipt", "kind": "perception", "expected_route": "vision_only"}

  `id` (unique), `image` (a path relative to the folder), `question` and `answers` (a non-empty list of strings,
  any one of which counts) are required. `language` (`en`, `zh`) defaults to the question's, as
  `orchestrator.analysis.messages.detect_language` tells it; `category` to `custom`; `kind` (`perception`,
  `reasoning`) to `perception`; `expected_route` (`vision_only`, `vision_then_reasoning`) to null, which leaves the
  route unscored. Any other key is an error (a misspelt key would otherwise drop its field silently), as are a
  duplicate id, a missing image and a line that is not a JSON object: `CaseError`, naming the file and the line.

`load_set("default" | folder, seed)` picks one of the two. docs/evaluation.md shows the format with an example.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from orchestrator.analysis.messages import Language, detect_language
from orchestrator.analysis.routing import Decision
from orchestrator.evaluation import documents, pictures
from orchestrator.evaluation.canvas import CJK_PACKAGE, Fonts, Kind, Picture

__all__ = ["CATEGORIES", "Case", "CaseError", "Kind", "Language", "Route", "default_set", "load_folder", "load_set"]

log = logging.getLogger(__name__)
T = TypeVar("T", bound=str | None)

Route = Decision
CATEGORIES: tuple[str, ...] = ("receipt", "invoice", "menu", "price_list", "sign", "form", "ui", "chart", "scene")
LANGUAGES: tuple[Language, ...] = ("en", "zh")
KINDS: tuple[Kind, ...] = ("perception", "reasoning")
ROUTES: Mapping[Kind, Route] = {"perception": "vision_only", "reasoning": "vision_then_reasoning"}
"""The route each kind of question should take."""
CASES_FILE: Final = "cases.jsonl"
REQUIRED_KEYS = ("id", "image", "question", "answers")
OPTIONAL_KEYS = ("language", "category", "kind", "expected_route")
DEFAULT_CATEGORY = "custom"

Drawer = Callable[[random.Random, Language, Fonts], Picture]
DRAWERS: Mapping[str, Drawer] = {
    "receipt": documents.receipt, "invoice": documents.invoice, "menu": documents.menu,
    "price_list": documents.price_list, "form": documents.form, "sign": pictures.sign, "ui": pictures.ui,
    "chart": pictures.chart, "scene": pictures.scene,
}  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One question about one image, with the answers that count as right (any one of them)."""

    id: str
    category: str
    language: Language
    question: str
    kind: Kind
    expected_route: Route | None
    """None: the route is not scored."""
    answers: tuple[str, ...]
    image: bytes = field(repr=False)
    image_name: str


class CaseError(ValueError):
    """A case folder that cannot be read: the file, the line (None: the whole file) and what is wrong."""

    def __init__(self, file: Path, line: int | None, problem: str) -> None:
        self.file, self.line, self.problem = file, line, problem
        super().__init__(f"{file}{'' if line is None else f':{line}'}: {problem}")


# -- the generated set -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Drawn:
    """One generated image, where it belongs in the set, and what was drawn on it."""

    category: str
    language: Language
    number: int
    picture: Picture

    @property
    def name(self) -> str:
        return f"{self.category}-{self.language}-{self.number:02d}"

    def cases(self) -> list[Case]:
        return [
            Case(id=f"{self.name}-{ask.slug}", category=self.category, language=self.language, question=ask.question,
                 kind=ask.kind, expected_route=ROUTES[ask.kind], answers=ask.answers, image=self.picture.png,
                 image_name=f"{self.name}.png")
            for ask in self.picture.asks
        ]  # fmt: skip


def draw_set(seed: int = 0, *, per_category: int = 2, fonts: Fonts) -> list[Drawn]:
    """The generated images, category by category, English then Chinese; each drawn from its own `random.Random`
    (seeded with the seed, the category, the language and the number), so that leaving the Chinese out, or drawing
    fewer per category, changes no other image."""
    if per_category < 1:
        raise ValueError(f"per_category must be at least 1, not {per_category}")
    languages = LANGUAGES
    if fonts.cjk is None:
        log.warning("no CJK font found: the Chinese cases are left out (Debian: apt-get install %s)", CJK_PACKAGE)
        languages = ("en",)
    return [
        _draw(seed, category, language, number, fonts)
        for category in CATEGORIES
        for language in languages
        for number in range(1, per_category + 1)
    ]


def _draw(seed: int, category: str, language: Language, number: int, fonts: Fonts) -> Drawn:
    rng = random.Random(f"{seed}/{category}/{language}/{number}")
    return Drawn(category, language, number, DRAWERS[category](rng, language, fonts))


def default_set(seed: int = 0, *, per_category: int = 2) -> list[Case]:
    """The generated cases (module docstring), in this machine's fonts."""
    drawn = draw_set(seed, per_category=per_category, fonts=Fonts.find())
    return [case for image in drawn for case in image.cases()]


# -- a user's folder -------------------------------------------------------------------------------------------------


def load_set(name_or_path: str, seed: int = 0) -> list[Case]:
    """`default`: the generated set for `seed`; otherwise a folder holding cases.jsonl (or that file itself)."""
    if name_or_path == "default":
        return default_set(seed)
    path = Path(name_or_path)
    if path.is_file() and path.name == CASES_FILE:
        path = path.parent
    if path.is_dir():
        return load_folder(path)
    raise ValueError(
        f"no case set {name_or_path!r}: give `default` (the generated set) or a folder holding {CASES_FILE}"
    )


def load_folder(path: Path) -> list[Case]:
    """The cases in `path/cases.jsonl` (module docstring), in the file's order."""
    file = Path(path) / CASES_FILE
    if not file.is_file():
        raise CaseError(file, None, f"no such file; a case folder holds a {CASES_FILE}")
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise CaseError(file, raw[: error.start].count(b"\n") + 1, "not UTF-8 text") from None
    cases: list[Case] = []
    first_line: dict[str, int] = {}
    images: dict[Path, bytes] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        case = _Line(file, number).case(line, images)
        if case.id in first_line:
            raise CaseError(file, number, f"duplicate id {case.id!r} (first on line {first_line[case.id]})")
        first_line[case.id] = number
        cases.append(case)
    if not cases:
        raise CaseError(file, None, "no cases in the file")
    return cases


@dataclass(frozen=True)
class _Line:
    """One line of a cases.jsonl being read: where errors point."""

    file: Path
    number: int

    def error(self, problem: str) -> CaseError:
        return CaseError(self.file, self.number, problem)

    def case(self, line: str, images: dict[Path, bytes]) -> Case:
        record = self._record(line)
        question = self._string(record, "question")
        image = self._string(record, "image")
        kind = self._choice(record, "kind", KINDS, "perception")
        route = self._choice(record, "expected_route", (*ROUTES.values(), None), None)
        return Case(
            id=self._string(record, "id"),
            category=self._string(record, "category") if "category" in record else DEFAULT_CATEGORY,
            language=self._choice(record, "language", LANGUAGES, detect_language(question)),
            question=question,
            kind=kind,
            expected_route=route,
            answers=self._answers(record),
            image=self._image(image, images),
            image_name=Path(image).name,
        )

    def _record(self, line: str) -> dict[str, Any]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise self.error(f"not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise self.error(f"expected a JSON object, got {type(record).__name__}")
        if unknown := sorted(set(record) - {*REQUIRED_KEYS, *OPTIONAL_KEYS}):
            known = ", ".join((*REQUIRED_KEYS, *OPTIONAL_KEYS))
            raise self.error(f"unknown key(s) {', '.join(map(repr, unknown))}; the keys are {known}")
        if missing := [key for key in REQUIRED_KEYS if key not in record]:
            raise self.error(f"missing required key(s) {', '.join(map(repr, missing))}")
        return record

    def _string(self, record: dict[str, Any], key: str) -> str:
        value = record[key]
        if not isinstance(value, str) or not value.strip():
            raise self.error(f"{key!r} must be a non-empty string, got {json.dumps(value, ensure_ascii=False)}")
        return value

    def _choice(self, record: dict[str, Any], key: str, allowed: tuple[T, ...], default: T) -> T:
        if key not in record:
            return default
        for option in allowed:
            if record[key] == option:
                return option
        shown = ", ".join("null" if option is None else repr(option) for option in allowed)
        raise self.error(f"{key!r} must be one of {shown}, got {json.dumps(record[key], ensure_ascii=False)}")

    def _answers(self, record: dict[str, Any]) -> tuple[str, ...]:
        answers = record["answers"]
        if not isinstance(answers, list) or not answers:
            raise self.error("'answers' must be a non-empty list of strings")
        if not all(isinstance(answer, str) and answer.strip() for answer in answers):
            raise self.error("'answers' must hold non-empty strings only (write numbers as strings: \"54.06\")")
        return tuple(answers)

    def _image(self, image: str, images: dict[Path, bytes]) -> bytes:
        path = self.file.parent / image
        if path not in images:
            if not path.is_file():
                raise self.error(f"image {image!r} not found (looked for {path})")
            try:
                images[path] = path.read_bytes()
            except OSError as error:
                raise self.error(f"image {image!r} could not be read: {error.strerror}") from None
        return images[path]
