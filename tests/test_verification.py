"""Verifying claims against what the vision stage saw: every verdict, for every kind of claim."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from orchestrator.arbitration.claims import extract_claims
from orchestrator.arbitration.evidence import Evidence, evidence_from_vision
from orchestrator.arbitration.verification import Check, verify, verify_all
from tests.fakes import text_line
from vision_stage.relevance import Vector
from vision_stage.types import DetectedObject, ImageFacts, KeyValue, StructuredDescription, Tag, TextLine, VisionResult

RECEIPT = (
    "BLUEBOTTLECAFE",
    "2026-03-14 12:41",
    "Latte 2 x 18.00 36.00",
    "Subtotal 51.00",
    "Tax 3.06",
    "TOTAL 54.06",
    "谢谢惠顾",
)
FACTS = ImageFacts(600, 800, "portrait", "PNG", ())


def vision(
    lines: tuple[str, ...] = RECEIPT,
    *,
    backend: str = "ocr",
    objects: tuple[str, ...] = (),
    fields: tuple[KeyValue, ...] = (),
    description: str = "",
    tags: tuple[Tag, ...] = (),
    text_lines: tuple[TextLine, ...] | None = None,
) -> Evidence:
    structured = StructuredDescription(
        facts=FACTS,
        text_lines=text_lines if text_lines is not None else tuple(text_line(t, i) for i, t in enumerate(lines)),
        tags=tags,
        objects=tuple(DetectedObject(label) for label in objects),
        fields=fields,
    )
    result = VisionResult(backend, "m", "describe", "", description, structured)
    return evidence_from_vision(result)


def checks(answer: str, evidence: Evidence) -> list[Check]:
    return list(verify_all(extract_claims(answer, "en"), evidence))


def only(answer: str, evidence: Evidence) -> Check:
    (check,) = checks(answer, evidence)
    return check


# -- numbers --


@pytest.mark.parametrize("answer", ["The total is 54.06.", "The TOTAL is ¥54.060.", "总计54.06元", "合计是54,06元"])
def test_amount_on_its_referent_line_is_supported(answer: str) -> None:
    check = only(answer, vision())
    assert check.verdict == "supported"
    assert check.evidence is not None
    assert check.evidence.text == "TOTAL 54.06"


def test_wrong_total_is_contradicted_with_the_number_the_image_shows() -> None:
    check = only("The total is 51.00.", vision())
    assert check.verdict == "contradicted"
    assert check.evidence is not None
    assert check.evidence.text == "TOTAL 54.06"
    assert "54.06" in check.reason


def test_total_is_not_read_from_the_subtotal_line() -> None:
    check = only("The total is 51.00.", vision(("Subtotal 51.00", "Tax 3.06")))
    assert check.verdict == "unverifiable"


def test_amount_with_no_referent_line_is_unverifiable_even_when_the_number_is_there() -> None:
    assert only("The deposit is 54.06.", vision()).verdict == "unverifiable"
    assert only("The deposit is 99.00.", vision()).verdict == "unverifiable"


def test_bare_number_anywhere_is_supported() -> None:
    assert only("It shows 36.00.", vision()).verdict == "supported"


def test_referent_words_absent_from_the_image_are_dropped() -> None:
    assert only("The final total is 54.06.", vision()).verdict == "supported"


def test_percentages_only_match_percentages() -> None:
    assert only("The tax rate is 6%.", vision()).verdict == "unverifiable"


def test_columns_on_one_row_are_read_together() -> None:
    top = 100.0
    total = TextLine("TOTAL", ((40, top), (120, top), (120, top + 30), (40, top + 30)), 0.98, 0)
    amount = TextLine("54.06", ((400, top + 2), (480, top + 2), (480, top + 32), (400, top + 32)), 0.97, 1)
    evidence = vision(text_lines=(total, amount))
    assert only("The total is 54.06.", evidence).verdict == "supported"
    assert only("The total is 45.06.", evidence).verdict == "contradicted"


def test_fields_are_evidence() -> None:
    evidence = vision((), fields=(KeyValue("Total", "54.06"),), backend="glm")
    assert only("The total is 54.06.", evidence).verdict == "supported"
    assert only("The total is 8.00.", evidence).verdict == "contradicted"


def test_chinese_referent_matches_by_characters() -> None:
    evidence = vision(("小型车每小时5元", "夜间免费停车"))
    assert only("小型车每小时收费5元。", evidence).verdict == "supported"
    assert only("小型车每小时收费8元。", evidence).verdict == "contradicted"


def test_count_of_a_thing_on_a_receipt_is_checked_on_its_line() -> None:
    assert only("You bought 2 lattes.", vision()).verdict == "supported"
    assert only("You bought 3 lattes.", vision()).verdict == "contradicted"


# -- dates and times --


@pytest.mark.parametrize("answer", ["Dated March 14, 2026.", "日期是2026年3月14日。", "On 14/03/2026.", "On 3月14日."])
def test_date_in_any_format_is_supported(answer: str) -> None:
    assert only(answer, vision()).verdict == "supported"


def test_wrong_date_is_contradicted_and_missing_dates_are_unverifiable() -> None:
    check = only("Dated March 15, 2026.", vision())
    assert check.verdict == "contradicted"
    assert "2026-03-14" in check.reason
    assert only("Dated March 15, 2026.", vision(("TOTAL 54.06",))).verdict == "unverifiable"


def test_times() -> None:
    assert only("Paid at 12:41.", vision()).verdict == "supported"
    assert only("Paid at 1:41 pm.", vision()).verdict == "contradicted"


# -- quotes --


@pytest.mark.parametrize(
    "quote", ["“BLUE BOTTLE CAFE”", "“Blue Bottle Café”", "「ＴＯＴＡＬ ５４.０６」", "“谢谢惠顾”"]
)
def test_quote_matches_despite_spaces_case_and_width(quote: str) -> None:
    assert only(f"The receipt reads {quote}.", vision()).verdict == "supported"


def test_misquote_is_contradicted_with_the_line_read() -> None:
    check = only("The sign says “NO SMOKING”.", vision(("NOPARKING",)))
    assert check.verdict == "contradicted"
    assert check.evidence is not None
    assert check.evidence.text == "NOPARKING"


def test_quote_presented_as_image_text_but_absent_is_contradicted_otherwise_unverifiable() -> None:
    assert only("The sign says “STAFF ONLY”.", vision(("WETFLOOR",))).verdict == "contradicted"
    assert only("This counts as a “meal expense”.", vision(("WETFLOOR",))).verdict == "unverifiable"
    assert only("The sign says “STAFF ONLY”.", vision(())).verdict == "unverifiable"


@dataclass
class FakeEmbedder:
    """Texts embed as the vectors given (normalised), anything else as `default`."""

    vectors: dict[str, tuple[float, ...]]
    default: tuple[float, ...] = (0.0, 0.0, 1.0)
    calls: list[object] = field(default_factory=list)

    def query(self, text: str, /) -> Vector:
        self.calls.append(text)
        return self._unit(text)

    def passage(self, texts: list[str], /) -> Vector:
        self.calls.append(texts)
        return np.stack([self._unit(text) for text in texts])

    def _unit(self, text: str) -> Vector:
        vector = np.asarray(self.vectors.get(text, self.default), dtype=np.float32)
        unit: Vector = vector / np.linalg.norm(vector)
        return unit


def test_embedder_supports_a_translated_quote_but_never_contradicts() -> None:
    evidence = vision(("禁止吸烟", "夜间免费停车"))
    embedder = FakeEmbedder(
        {"禁止吸烟": (1.0, 0.0, 0.0), "No smoking": (0.99, 0.05, 0.0), "夜间免费停车": (0.0, 1.0, 0.0)}
    )
    (claim,) = extract_claims("This is a “No smoking” notice.", "en")
    assert verify(claim, evidence).verdict == "unverifiable"
    translated = verify(claim, evidence, embedder)
    assert translated.verdict == "supported"
    assert translated.evidence is not None
    assert translated.evidence.text == "禁止吸烟"
    (other,) = extract_claims("This is a “Free parking” notice.", "en")
    assert verify(other, evidence, embedder).verdict == "unverifiable"


# -- objects and people --


def test_ocr_backend_cannot_see_people_so_absence_is_unverifiable() -> None:
    for answer in ("A person is walking.", "There is no person.", "There are two people.", "图中没有人。"):
        assert only(answer, vision()).verdict == "unverifiable", answer


def test_backend_listing_objects_supports_and_contradicts_presence() -> None:
    evidence = vision((), backend="glm", objects=("car", "tree"))
    assert only("I see a car.", evidence).verdict == "supported"
    assert only("A person is walking.", evidence).verdict == "contradicted"
    assert only("There is no person.", evidence).verdict == "supported"
    assert only("There is no car.", evidence).verdict == "contradicted"
    assert only("图中有一辆车。", evidence).verdict == "supported"


def test_counts_against_listed_objects() -> None:
    evidence = vision((), backend="glm", objects=("person", "man", "car"))
    assert only("There are two people.", evidence).verdict == "supported"
    check = only("There are three people.", evidence)
    assert check.verdict == "contradicted"
    assert "2" in check.reason


def test_model_description_with_negation_contradicts_presence() -> None:
    evidence = vision((), backend="glm", description="A quiet street. No people are visible.")
    check = only("A person is walking.", evidence)
    assert check.verdict == "contradicted"
    assert check.evidence is not None
    assert check.evidence.source == "description"
    assert only("Nobody is there.", evidence).verdict == "supported"


def test_confident_tags_support_objects() -> None:
    evidence = vision((), tags=(Tag("sports car", 0.7), Tag("tabby cat", 0.1)))
    assert only("I see a car.", evidence).verdict == "supported"
    assert only("I see a cat.", evidence).verdict == "unverifiable"


def test_amounts_run_together_by_ocr_still_match_but_a_wrong_one_does_not() -> None:
    evidence = vision(("Sandwich3x5.7517.25",))
    assert only("The sandwich costs 5.75.", evidence).verdict == "supported"
    assert only("The sandwich costs 6.75.", evidence).verdict == "contradicted"
