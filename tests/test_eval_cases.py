"""The evaluation's cases (`orchestrator/evaluation/cases.py`): the generated default set (a user's folder and the
questions' wording: `test_eval_folder.py`).

The generated set is checked against what its images show: each generator records every text row and shape it
draws, and the answers are recomputed here from those rows (a receipt's total from its item lines and tax, an
invoice's days overdue from its due date, a chart's gap from its bars, a scene's counts from its shapes). A test marked
`slow` reads a few generated images with the real embedded OCR. The Chinese half needs a CJK font (`make fonts`).
"""

from __future__ import annotations

import io
import logging
import re
from collections import Counter
from collections.abc import Callable
from datetime import date
from decimal import ROUND_HALF_UP, Decimal

import pytest
from PIL import Image

from orchestrator.evaluation.canvas import Ask, Fonts
from orchestrator.evaluation.cases import (
    CATEGORIES,
    Case,
    Drawn,
    default_set,
    draw_set,
)
from orchestrator.evaluation.wording import count_answers, zh_number

FONTS = Fonts.find()
needs_cjk = pytest.mark.skipif(FONTS.cjk is None, reason="no CJK font installed (Debian: fonts-wqy-microhei)")
LANGUAGES = ("en", "zh") if FONTS.cjk else ("en",)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def drawn() -> list[Drawn]:
    return draw_set(0, fonts=FONTS)


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    return default_set(0)


def of(drawn: list[Drawn], category: str) -> list[Drawn]:
    return [image for image in drawn if image.category == category]


def asks(image: Drawn) -> dict[str, Ask]:
    return {ask.slug: ask for ask in image.picture.asks}


def squash(text: str) -> str:
    return re.sub(r"\s+", "", text).casefold()


# -- the generated set: its shape ------------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_cases_and_the_same_png_bytes(cases: list[Case]) -> None:
    again = default_set(0)
    assert again == cases
    assert [case.image for case in again] == [case.image for case in cases]


def test_another_seed_gives_other_values_under_the_same_ids(cases: list[Case]) -> None:
    other = default_set(1)
    assert {case.image_name for case in other} == {c.image_name for c in cases}
    answers = {case.id: case.answers for case in cases}
    changed = [case.id for case in other if answers.get(case.id) != case.answers]
    assert len(changed) > len(other) / 2
    assert sum(a.image != b.image for a, b in zip(cases, other, strict=False)) > len(cases) / 2


def test_every_category_has_every_language_with_two_images_each(cases: list[Case]) -> None:
    images = {(case.category, case.language, case.image_name) for case in cases}
    per_category = Counter((category, language) for category, language, _ in images)
    assert per_category == {(category, language): 2 for category in CATEGORIES for language in LANGUAGES}


@needs_cjk
def test_the_chinese_cases_are_asked_in_chinese(cases: list[Case]) -> None:
    chinese = [case for case in cases if case.language == "zh"]
    assert len(chinese) == len(cases) / 2
    assert all(re.search(r"[\u4e00-\u9fff]", case.question) for case in chinese)
    assert not any(re.search(r"[\u4e00-\u9fff]", case.question) for case in cases if case.language == "en")


def test_ids_are_unique_and_every_case_is_complete(cases: list[Case]) -> None:
    assert len({case.id for case in cases}) == len(cases)
    for case in cases:
        assert case.answers, case.id
        assert all(answer.strip() for answer in case.answers), case.id
        assert case.image.startswith(PNG)
        assert case.image_name.endswith(".png")
        assert case.id.startswith(case.image_name.removesuffix(".png") + "-")
        route = {"perception": "vision_only", "reasoning": "vision_then_reasoning"}[case.kind]
        assert case.expected_route == route, case.id


def test_every_image_asks_two_or_three_questions_one_read_and_one_reasoned(drawn: list[Drawn]) -> None:
    for image in drawn:
        kinds = [ask.kind for ask in image.picture.asks]
        assert 2 <= len(kinds) <= 3, image.name
        assert {"perception", "reasoning"} <= set(kinds), image.name


def test_images_are_600_to_900_pixels_on_the_long_side(drawn: list[Drawn]) -> None:
    for image in drawn:
        with Image.open(io.BytesIO(image.picture.png)) as opened:
            assert 600 <= max(opened.size) <= 900, (image.name, opened.size)


def test_fewer_per_category_draws_the_same_first_images(cases: list[Case]) -> None:
    fewer = default_set(0, per_category=1)
    assert fewer == [case for case in cases if "-01-" in case.id]


def test_without_a_cjk_font_the_chinese_cases_are_left_out_with_one_warning(
    drawn: list[Drawn], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="orchestrator.evaluation.cases"):
        english = draw_set(0, fonts=Fonts(latin=FONTS.latin, latin_bold=FONTS.latin_bold, cjk=None))

    assert {image.language for image in english} == {"en"}
    assert [image.picture for image in english] == [image.picture for image in drawn if image.language == "en"]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "fonts-wqy-microhei" in warnings[0]


def test_no_cjk_font_is_found_where_none_is() -> None:
    assert Fonts.find(cjk_candidates=["/nonexistent/font.ttc"]).cjk is None


def test_a_bad_per_category_is_refused() -> None:
    with pytest.raises(ValueError, match="per_category"):
        default_set(0, per_category=0)


# -- the generated set: its ground truth, against what is drawn ------------------------------------------------------

MONEY = re.compile(r"\d+\.\d\d")


def money(value: Decimal) -> str:
    return str(value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def cell(image: Drawn, label: str) -> str:
    """The value drawn beside `label`."""
    return next(row[1] for row in image.picture.rows if row[0] == label)


def bill(image: Drawn) -> tuple[Decimal, Decimal, Decimal]:
    """A receipt's or invoice's subtotal, tax and total as drawn, each checked against the rows above it."""
    rows = image.picture.rows
    amounts = []
    for _, each, amount in (row for row in rows if len(row) == 3):
        quantity, price = each.split(" x ")
        assert Decimal(price) * int(quantity) == Decimal(amount), image.name
        amounts.append(Decimal(amount))
    (_, subtotal), (tax_label, tax), (_, total) = [row for row in rows if len(row) == 2 and MONEY.fullmatch(row[1])]
    rate = int(re.findall(r"(\d+)%", tax_label)[0])
    assert Decimal(subtotal) == sum(amounts)
    assert Decimal(tax) == (Decimal(subtotal) * rate / 100).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    assert Decimal(total) == Decimal(subtotal) + Decimal(tax)
    return Decimal(subtotal), Decimal(tax), Decimal(total)


def asked_date(ask: Ask) -> date:
    return date.fromisoformat(re.findall(r"\d{4}-\d\d-\d\d", ask.question)[0])


def test_a_receipts_total_is_its_item_lines_plus_tax_and_the_change_follows(drawn: list[Drawn]) -> None:
    for image in of(drawn, "receipt"):
        _, _, total = bill(image)
        ask = asks(image)
        paid = Decimal(re.findall(r"\d+", ask["change"].question)[0])
        assert ask["total"].answers == (money(total),)
        assert ask["change"].answers == (money(paid - total),)
        assert paid > total
        assert squash(ask["shop"].answers[0]) == squash(image.picture.rows[0][0])


def test_an_invoices_amount_and_days_overdue_follow_from_what_it_shows(drawn: list[Drawn]) -> None:
    for image in of(drawn, "invoice"):
        _, _, total = bill(image)
        ask = asks(image)
        english = image.language == "en"
        due = date.fromisoformat(cell(image, "Due date" if english else "付款期限"))
        assert ask["amount"].answers == (money(total),)
        assert ask["number"].answers == (cell(image, "Invoice No." if english else "发票号码"),)
        assert ask["overdue"].answers[0] == str((asked_date(ask["overdue"]) - due).days)


def prices(image: Drawn) -> dict[str, Decimal]:
    return {row[0]: Decimal(row[1]) for row in image.picture.rows if len(row) == 2}


def test_a_menus_prices_and_an_orders_cost_follow_from_its_rows(drawn: list[Drawn]) -> None:
    for image in of(drawn, "menu"):
        listed, ask = prices(image), asks(image)
        item = next(name for name in listed if name in ask["price"].question)
        pattern = r"order two (.+) and one (.+), how" if image.language == "en" else r"两份(.+)和一份(.+)总共"
        double, single = re.findall(pattern, ask["order"].question)[0]
        assert ask["price"].answers == (money(listed[item]),)
        assert ask["order"].answers == (money(2 * listed[double] + listed[single]),)


def test_a_price_lists_prices_and_a_purchases_cost_follow_from_its_rows(drawn: list[Drawn]) -> None:
    for image in of(drawn, "price_list"):
        listed, ask = prices(image), asks(image)
        item = next(name for name in listed if name in ask["price"].question)
        pattern = (
            r"buy (\d) kg of (.+) and 1 kg of (.+), how" if image.language == "en" else r"买(\d)公斤(.+)和1公斤(.+)，"
        )
        kilos, several, one = re.findall(pattern, ask["cost"].question)[0]
        assert ask["price"].answers == (money(listed[item]),)
        assert ask["cost"].answers == (money(int(kilos) * listed[several] + listed[one]),)


def test_a_forms_fields_and_an_age_follow_from_its_rows(drawn: list[Drawn]) -> None:
    for image in of(drawn, "form"):
        ask = asks(image)
        labels = {"en": ("Name", "Date of birth", "ID number"), "zh": ("姓名", "出生日期", "证件号码")}
        name, born, number = (cell(image, label) for label in labels[image.language])
        today, birth = asked_date(ask["age"]), date.fromisoformat(born)
        had_birthday = (today.month, today.day) >= (birth.month, birth.day)
        assert ask["name"].answers == (name,)
        assert ask["id"].answers == (number,)
        assert ask["age"].answers[0] == str(today.year - birth.year - (0 if had_birthday else 1))


def test_a_signs_text_and_hours_follow_from_what_it_shows(drawn: list[Drawn]) -> None:
    for image in of(drawn, "sign"):
        ask = asks(image)
        *words, hours = (row[0] for row in image.picture.rows)
        start, end = (int(hour) for hour in re.findall(r"(\d\d):00", hours))
        assert squash(ask["text"].answers[0]) == squash("".join(words))
        assert ask["hours"].answers[0] == str(end - start)


def test_a_dialogs_title_buttons_and_items_left_follow_from_what_it_shows(drawn: list[Drawn]) -> None:
    for image in of(drawn, "ui"):
        ask = asks(image)
        title, status, _, confirm, *others = (row[0] for row in image.picture.rows)
        done, total = (int(n) for n in re.findall(r"\d+", status))
        if image.language == "zh":
            total, done = done, total  # "共{total}项，已完成{done}项"
        assert ask["title"].answers[0] == title
        assert ask["button"].answers[0] == confirm
        assert set(others) <= {"Cancel", "Help", "取消", "帮助"}
        assert len(others) in (1, 2)
        assert ask["remaining"].answers[0] == str(total - done)


def test_a_charts_tallest_bar_month_and_gap_follow_from_its_bars(drawn: list[Drawn]) -> None:
    for image in of(drawn, "chart"):
        ask = asks(image)
        bars = {label: int(value) for label, value in image.picture.rows[1:]}
        month = next(label for label in bars if label in ask["month"].question)
        assert ask["tallest"].answers == (str(max(bars.values())),)
        assert ask["month"].answers == (str(bars[month]),)
        assert ask["gap"].answers == (str(max(bars.values()) - min(bars.values())),)


def test_a_scenes_counts_follow_from_its_shapes(drawn: list[Drawn]) -> None:
    for image in of(drawn, "scene"):
        ask = asks(image)
        shapes = Counter(shape for shape, _ in image.picture.marks)
        assert not image.picture.rows
        assert ask["circles"].answers[0] == str(shapes["circle"])
        assert ask["squares"].answers[0] == str(shapes["square"])
        assert ask["difference"].answers[0] == str(shapes["circle"] - shapes["triangle"])
        assert shapes["circle"] > shapes["triangle"] >= 1


def test_every_read_answer_is_written_on_its_image(drawn: list[Drawn]) -> None:
    for image in drawn:
        written = squash(" ".join(" ".join(row) for row in image.picture.rows))
        for ask in image.picture.asks:
            if ask.kind == "perception" and image.category != "scene":
                assert squash(ask.answers[0]) in written, (image.name, ask.slug)


def test_counts_are_answered_in_digits_and_in_words_bound_to_their_unit() -> None:
    assert count_answers(3, ("circle", "circles"), ("个",)) == ("3", "three circles", "三个")
    assert count_answers(2, ("day", "days"), ("天",)) == ("2", "two days", "二天", "两天")
    assert count_answers(1, ("square", "squares"), ("个",))[1] == "one square"
    assert count_answers(42, ("year old", "years old"), ("岁",)) == ("42", "四十二岁")
    assert [zh_number(n) for n in (0, 7, 10, 12, 20, 42, 99)] == ["零", "七", "十", "十二", "二十", "四十二", "九十九"]


# -- the generated set: legible to the embedded OCR ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ocr() -> Callable[[bytes], str]:
    from vision_stage.ocr import RapidTextReader

    reader = RapidTextReader.load()

    def read(png: bytes) -> str:
        with Image.open(io.BytesIO(png)) as image:
            return squash(" ".join(line.text for line in reader.read(image)))

    return read


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["receipt-en-01", pytest.param("sign-zh-01", marks=needs_cjk), "chart-en-01", "invoice-en-02"]
)
def test_the_embedded_ocr_reads_the_answers_off_generated_images(
    name: str, drawn: list[Drawn], ocr: Callable[[bytes], str]
) -> None:
    image = next(image for image in drawn if image.name == name)
    text = ocr(image.picture.png)
    for ask in image.picture.asks:
        if ask.kind == "perception":
            assert any(squash(answer) in text for answer in ask.answers), (ask.slug, ask.answers, text)
