"""Drawing the generated evaluation images, and keeping a record of what was drawn and what is asked about it.

A `Canvas` draws text and shapes with Pillow alone and records every text row (its cells, left to right) and every
shape it draws, so the ground truth can be checked against what the image shows (`Picture.rows`, `Picture.marks`).
`Fonts.find()` looks for the fonts on this machine: DejaVu Sans for Latin text (Pillow's own scalable font when it is
absent) and a CJK font among the common system paths (`CJK_FONTS`) for Chinese; without one, no Chinese image is
drawn. PNGs are written without metadata, so the same drawing gives the same bytes.
"""

from __future__ import annotations

import functools
import io
import string
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from PIL import Image, ImageDraw, ImageFont

from orchestrator.analysis.messages import Language

Kind = Literal["perception", "reasoning"]
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
Colour = str | tuple[int, int, int]
Anchor = Literal["la", "ma", "ra", "lm", "mm", "rm"]
"""Pillow's text anchors used here: left, middle or right; top (`a`) or middle (`m`)."""

CJK_FONTS: tuple[str, ...] = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJKsc-Regular.otf",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/usr/share/fonts/truetype/droid/DroidSansFallback.ttf",
    "/System/Library/Fonts/PingFang.ttc",
    "C:/Windows/Fonts/msyh.ttc",
)
"""Where a CJK font is looked for, in order (Debian: `fonts-wqy-microhei`, `fonts-wqy-zenhei`, `fonts-noto-cjk`,
`fonts-droid-fallback`)."""
LATIN_FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
LATIN_BOLD_FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
CJK_PACKAGE = "fonts-wqy-microhei"
"""The Debian package to install for the Chinese images."""


@dataclass(frozen=True)
class Fonts:
    """The font files text is drawn in; None where none was found (Latin: Pillow's own font then)."""

    latin: str | None
    latin_bold: str | None
    cjk: str | None

    @classmethod
    def find(cls, cjk_candidates: Sequence[str] = CJK_FONTS) -> Fonts:
        def present(path: str) -> str | None:
            return path if Path(path).is_file() else None

        cjk = next((path for path in cjk_candidates if Path(path).is_file()), None)
        return cls(latin=present(LATIN_FONT), latin_bold=present(LATIN_BOLD_FONT), cjk=cjk)

    def has_bold(self, language: Language) -> bool:
        return language == "en" and self.latin_bold is not None

    def font(self, language: Language, size: int, *, bold: bool = False) -> Font:
        """A font for `language` at `size` pixels: the CJK font draws Chinese images' Latin letters and digits too."""
        if language == "zh":
            if self.cjk is None:
                raise ValueError(f"no CJK font to draw Chinese text (install {CJK_PACKAGE})")
            return _truetype(self.cjk, size)
        path = self.latin_bold if bold and self.latin_bold else self.latin
        return _truetype(path, size) if path else ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=64)
def _truetype(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


@dataclass(frozen=True)
class Ask:
    """One question about a picture and its accepted answers, computed from the values the picture was drawn from."""

    slug: str
    kind: Kind
    question: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class Question:
    """A question's wording in English and Chinese, with `{placeholders}` for the values of one picture."""

    slug: str
    kind: Kind
    en: str
    zh: str

    def ask(self, language: Language, answers: tuple[str, ...], **values: object) -> Ask:
        return Ask(self.slug, self.kind, (self.en if language == "en" else self.zh).format(**values), answers)


QUESTIONS_FILE = "data/eval_questions.toml"
"""The questions' wording, in the `orchestrator` package."""


def questions(category: str) -> Mapping[str, Question]:
    """The questions asked about a `category` picture (`QUESTIONS_FILE`), by slug."""
    return _questions()[category]


@functools.cache
def _questions() -> dict[str, dict[str, Question]]:
    return read_questions(resources.files("orchestrator").joinpath(QUESTIONS_FILE).read_text(encoding="utf-8"))


def read_questions(text: str) -> dict[str, dict[str, Question]]:
    """Every category's questions in `text` (TOML), checked: a kind of `perception` or `reasoning`, and the same
    `{placeholders}` in both languages."""
    table = tomllib.loads(text)
    read: dict[str, dict[str, Question]] = {}
    for category, entries in table.items():
        for slug, entry in entries.items():
            question = Question(slug, entry["kind"], entry["en"], entry["zh"])
            if question.kind not in ("perception", "reasoning"):
                raise ValueError(f"{category}.{slug}: kind {question.kind!r}, not perception or reasoning")
            if _fields(question.en) != _fields(question.zh):
                raise ValueError(f"{category}.{slug}: the English and Chinese placeholders differ")
            read.setdefault(category, {})[slug] = question
    return read


def _fields(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


@dataclass(frozen=True)
class Picture:
    """A generated image: its PNG, every text row drawn (cells left to right, in drawing order), every shape drawn
    (`(shape, colour name)`), and the questions asked about it."""

    png: bytes
    rows: tuple[tuple[str, ...], ...]
    marks: tuple[tuple[str, str], ...]
    asks: tuple[Ask, ...]


@dataclass
class Canvas:
    """One image being drawn, in one language's fonts."""

    fonts: Fonts
    language: Language
    size: tuple[int, int]
    background: Colour = "white"
    rows: list[tuple[str, ...]] = field(default_factory=list)
    marks: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.image = Image.new("RGB", self.size, self.background)
        self.draw = ImageDraw.Draw(self.image)

    def text(
        self,
        xy: tuple[float, float],
        text: str,
        size: int,
        *,
        fill: Colour = "black",
        anchor: Anchor = "la",
        bold: bool = False,
        record: bool = True,
    ) -> None:
        """Draw `text`, recorded as a row of one cell unless `record` is False (then `record_row` says it)."""
        font = self.fonts.font(self.language, size, bold=bold)
        stroke = 1 if bold and not self.fonts.has_bold(self.language) else 0  # a font without a bold face: thicken it
        self.draw.text(xy, text, fill=fill, font=font, anchor=anchor, stroke_width=stroke, stroke_fill=fill)
        if record:
            self.rows.append((text,))

    def row(self, y: float, cells: Sequence[tuple[float, str, Anchor]], size: int, *, bold: bool = False) -> None:
        """Draw one line of cells (`(x, text, anchor)`), recorded as one row."""
        for x, text, anchor in cells:
            self.text((x, y), text, size, anchor=anchor, bold=bold, record=False)
        self.record_row(*(text for _, text, _ in cells))

    def record_row(self, *cells: str) -> None:
        self.rows.append(cells)

    def width(self, text: str, size: int, *, bold: bool = False) -> float:
        return self.draw.textlength(text, font=self.fonts.font(self.language, size, bold=bold))

    def rule(self, y: float, left: float, right: float, *, fill: Colour = "black", width: int = 2) -> None:
        self.draw.line(((left, y), (right, y)), fill=fill, width=width)

    def shape(self, kind: str, centre: tuple[float, float], radius: float, colour: tuple[str, Colour]) -> None:
        """A `circle`, `square` or `triangle` around `centre`, filled with `colour` (name, value), recorded."""
        x, y = centre
        name, value = colour
        if kind == "circle":
            self.draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=value)
        elif kind == "square":
            side = radius * 0.9
            self.draw.rectangle((x - side, y - side, x + side, y + side), fill=value)
        elif kind == "triangle":
            self.draw.polygon(((x, y - radius), (x + radius, y + radius * 0.8), (x - radius, y + radius * 0.8)), value)
        else:
            raise ValueError(f"no such shape: {kind!r}")
        self.marks.append((kind, name))

    def picture(self, asks: Sequence[Ask]) -> Picture:
        buffer = io.BytesIO()
        self.image.save(buffer, "PNG", optimize=False)
        return Picture(png=buffer.getvalue(), rows=tuple(self.rows), marks=tuple(self.marks), asks=tuple(asks))
