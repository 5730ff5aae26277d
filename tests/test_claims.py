"""Claim extraction: every kind, in Chinese and English, with the values and referents verification relies on."""

from __future__ import annotations

import pytest

from orchestrator.arbitration.claim_values import find_dates, parse_number
from orchestrator.arbitration.claims import Claim, extract_claims


def claims_of(answer: str, kind: str) -> list[Claim]:
    return [claim for claim in extract_claims(answer, "en") if claim.kind == kind]


def test_english_amount_keeps_value_referent_and_span() -> None:
    answer = "The total is ¥54.060, paid in cash."
    (claim,) = claims_of(answer, "number")
    assert (claim.value, claim.referent, claim.unit) == ("54.06", "total", "¥")
    assert answer[claim.span[0] : claim.span[1]].strip() == "¥54.060"


def test_chinese_amount_referent_is_the_words_before_it() -> None:
    (claim,) = claims_of("这张小票的总金额是54.06元。", "number")
    assert (claim.value, claim.referent, claim.unit) == ("54.06", "总金额", "元")
    (plain,) = claims_of("总计54.06元", "number")
    assert plain.referent == "总计"


def test_referent_stops_at_the_previous_number_and_falls_back_to_words_after() -> None:
    numbers = claims_of("2 lattes at 18.00 each and 1 croissant for 15.00. You spent 54.06 in total.", "number")
    assert [(c.value, c.referent) for c in numbers] == [("18", "lattes"), ("15", "croissant"), ("54.06", "total")]


@pytest.mark.parametrize(
    ("text", "value"),
    [("54.06", "54.06"), ("54.060", "54.060"), ("1,234.50", "1234.50"), ("54,06", "54.06"), ("7", "7")],
)
def test_number_normalisation(text: str, value: str) -> None:
    assert parse_number(text) == parse_number(value)


@pytest.mark.parametrize(
    ("text", "reading"),
    [
        ("dated 2026-03-14", "2026-03-14"),
        ("日期是2026年3月14日", "2026-03-14"),
        ("on March 14, 2026", "2026-03-14"),
        ("on 14 March 2026", "2026-03-14"),
        ("on 14/03/2026", "2026-03-14"),
        ("on 03/04/2026", "2026-03-04|2026-04-03"),
        ("3月14日", "--03-14"),
        ("2026-03-1412:41", "2026-03-14"),
    ],
)
def test_dates_are_normalised(text: str, reading: str) -> None:
    (claim,) = claims_of(text, "date")
    assert claim.value == reading


def test_dates_read_as_dates_are_not_numbers() -> None:
    assert claims_of("The receipt is dated 2026-03-14.", "number") == []


@pytest.mark.parametrize(("text", "reading"), [("at 12:41", "12:41"), ("下午3点05分", "15:05"), ("3:05 pm", "15:05")])
def test_times_are_normalised_to_24_hours(text: str, reading: str) -> None:
    (claim,) = claims_of(text, "time")
    assert claim.value == reading


@pytest.mark.parametrize(
    ("answer", "kind", "value", "referent"),
    [
        # a quote's referent is the cue that presents it as the image's text, if any
        ("The sign says “NO PARKING”.", "quote", "NO PARKING", "says"),
        ('It reads "TOTAL 54.06".', "quote", "TOTAL 54.06", "reads"),
        ("标牌上写着「禁止吸烟」。", "quote", "禁止吸烟", "写着"),
        ("This is a “meal expense”.", "quote", "meal expense", ""),
        # a count's referent is what it counts
        ("There are two people.", "count", "2", "person"),
        ("You bought 3 items.", "count", "3", "item"),
        ("two small dogs", "count", "2", "dog"),
        ("图中有两个人。", "count", "2", "person"),
        ("共3件商品。", "count", "3", "商品"),
    ],
)
def test_quotes_with_their_cue_and_counts_with_what_they_count(
    answer: str, kind: str, value: str, referent: str
) -> None:
    (claim,) = claims_of(answer, kind)
    assert (claim.value, claim.referent) == (value, referent)


def test_numbers_inside_quotes_make_no_number_claim() -> None:
    assert claims_of("It reads “TOTAL 54.06”.", "number") == []


@pytest.mark.parametrize(
    ("answer", "concept", "negated"),
    [
        ("I see a person walking.", "person", False),
        ("There is no signature.", "signature", True),
        ("There isn't any dog here.", "dog", True),
        ("Nobody is in the picture.", "person", True),
        ("图中有一辆车。", "car", False),
        ("图中没有人。", "person", True),
    ],
)
def test_objects_and_yes_no_assertions(answer: str, concept: str, negated: bool) -> None:
    (claim,) = claims_of(answer, "object")
    assert (claim.value, claim.negated) == (concept, negated)


def test_advice_about_objects_is_not_a_claim_about_the_image() -> None:
    assert extract_claims("The form needs a signature; if a person signs it, ask someone.", "en") == ()
    assert extract_claims("建议找一个人签名。", "zh") == ()


def test_a_count_is_not_also_a_number_or_an_object() -> None:
    kinds = [claim.kind for claim in extract_claims("There are two people and 3 items.", "en")]
    assert kinds == ["count", "count"]


def test_claims_come_in_the_order_of_the_answer() -> None:
    answer = "On 2026-03-14 at 12:41 the sign said “OPEN”; the total was 54.06 and there was no person."
    assert [claim.kind for claim in extract_claims(answer, "en")] == ["date", "time", "quote", "number", "object"]


def test_find_dates_reports_positions() -> None:
    ((span, reading),) = find_dates("x 2026/3/14 y")
    assert span == (2, 11)
    assert reading == "2026-03-14"
