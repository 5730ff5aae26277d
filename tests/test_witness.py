"""The OCR witness in verification and decision: it overrules the vision stage where it reads a total, a date or a
quoted name otherwise (English and Chinese), citing both readings, and is silent where it agrees, has nothing to
say, or reads garbage. Pure: evidence built by hand."""

from __future__ import annotations

from dataclasses import replace

import pytest

from orchestrator.analysis.messages import Language
from orchestrator.arbitration.claims import extract_claims
from orchestrator.arbitration.decision import conflict_notice, correction_prompt, decide, evidence_quality
from orchestrator.arbitration.evidence import Evidence, EvidenceItem, evidence_from_vision
from orchestrator.arbitration.verification import Check, verify_all
from tests.fakes import text_line
from vision_stage.types import ImageFacts, KeyValue, StructuredDescription, TextLine, VisionResult

FACTS = ImageFacts(600, 800, "portrait", "PNG", ())

EN_TRUE = ("BLUE LOTUS CAFE", "Date: 2026-03-14", "Latte 2 x 18.00 36.00", "Tax 3.06", "TOTAL 80.00")
EN_MISREAD = ("BLUE BOTTLE CAFE", "Date: 2026-03-19", "Latte 2 x 18.00 36.00", "Tax 3.06", "Total: 90.00")
ZH_TRUE = ("蓝瓶咖啡 上海店", "日期：2026年3月14日", "拿铁 2 x 18.00 36.00", "合计 80.00元")
ZH_MISREAD = ("蓝杯咖啡 上海店", "日期：2026年3月19日", "拿铁 2 x 18.00 36.00", "合计：90.00元")

# (language, what the vision stage read, what the witness read, the answer, the claim, vision's row, witness's row)
MISREADINGS = [
    ("en", EN_MISREAD, EN_TRUE, "The total is 90.00.", "90.00", "Total: 90.00", "TOTAL 80.00"),
    ("en", EN_MISREAD, EN_TRUE, "The receipt is dated 2026-03-19.", "2026-03-19", "Date: 2026-03-19",
     "Date: 2026-03-14"),
    ("en", EN_MISREAD, EN_TRUE, "The shop is “Blue Bottle Cafe”.", "“Blue Bottle Cafe”", "BLUE BOTTLE CAFE",
     "BLUE LOTUS CAFE"),
    ("zh", ZH_MISREAD, ZH_TRUE, "合计是90.00元。", "90.00元", "合计：90.00元", "合计 80.00元"),
    ("zh", ZH_MISREAD, ZH_TRUE, "日期是2026年3月19日。", "2026年3月19日", "日期：2026年3月19日", "日期：2026年3月14日"),
    ("zh", ZH_MISREAD, ZH_TRUE, "店名是“蓝杯咖啡”。", "“蓝杯咖啡”", "蓝杯咖啡 上海店", "蓝瓶咖啡 上海店"),
]  # fmt: skip


def lines(texts: tuple[str, ...], score: float = 0.99) -> tuple[TextLine, ...]:
    return tuple(replace(text_line(text, order), score=score) for order, text in enumerate(texts))


def evidence(
    seen: tuple[str, ...],
    witness: tuple[str, ...] | tuple[TextLine, ...] = (),
    *,
    backend: str = "glm",
    fields: tuple[KeyValue, ...] = (),
) -> Evidence:
    """The vision stage's evidence from `seen`, with the witness's lines (texts read with a score of 0.99)."""
    structured = StructuredDescription(FACTS, lines(seen), fields=fields)
    read = [line if isinstance(line, TextLine) else text_line(str(line), i) for i, line in enumerate(witness)]
    return evidence_from_vision(VisionResult(backend, "m", "describe", "", "", structured), read)


def only(answer: str, against: Evidence, language: Language = "en") -> Check:
    (check,) = verify_all(extract_claims(answer, language), against)
    return check


@pytest.mark.parametrize(("language", "seen", "witness", "answer", "claim", "vision_row", "witness_row"), MISREADINGS)
def test_the_witness_contradicts_a_vision_misreading_citing_both_readings(
    language: Language,
    seen: tuple[str, ...],
    witness: tuple[str, ...],
    answer: str,
    claim: str,
    vision_row: str,
    witness_row: str,
) -> None:
    alone = only(answer, evidence(seen), language)
    assert alone.verdict == "supported"  # the vision stage alone is fooled
    check = only(answer, evidence(seen, witness), language)
    assert check.claim.text == claim
    assert check.verdict == "contradicted"
    assert check.evidence is not None
    assert (check.evidence.source, check.evidence.text) == ("text", vision_row)
    assert check.witness is not None
    assert (check.witness.source, check.witness.text) == ("witness", witness_row)
    assert check.witness.where.startswith("witness line ")
    assert "the OCR witness read otherwise" in check.reason
    assert vision_row in check.reason
    assert witness_row in check.reason


@pytest.mark.parametrize(
    ("language", "seen", "answer"),
    [
        ("en", EN_TRUE, "The shop is “Blue Lotus Cafe”. The date is 2026-03-14. The total is 80.00."),
        ("zh", ZH_TRUE, "店名是“蓝瓶咖啡”。日期是2026年3月14日。合计是80.00元。"),
    ],
)
def test_a_witness_that_agrees_changes_nothing(language: Language, seen: tuple[str, ...], answer: str) -> None:
    claims = extract_claims(answer, language)
    alone = verify_all(claims, evidence(seen))
    # OCR drops spaces and reads columns apart; it still agrees
    witnessed = verify_all(claims, evidence(seen, tuple(text.replace(" ", "") for text in seen)))
    assert [check.verdict for check in alone] == ["supported"] * 3
    assert witnessed == alone


@pytest.mark.parametrize(
    ("answer", "witness"),
    [
        ("The total is 90.00.", ()),  # it read no text
        ("The total is 90.00.", ("THANK YOU", "Come again")),  # no referent line
        ("The total is 90.00.", ("TOTAL 8O.OO",)),  # a half-read number
        ("The total is 90.00.", ("TOTAL 54.O6",)),
        ("The total is 90.00.", ("TOTAL 80",)),  # written less precisely than the vision stage read it
        ("The total is 90.00.", ("Subtotal 80.00",)),  # not the referent
        ("The receipt is dated 2026-03-19.", ("Date: 2026-03-1A",)),  # a half-read date
        (
            "The receipt is dated 2026-03-19.",
            ("Printed 2026-02-01", "Valid until 2026-05-31"),
        ),  # no date row of its own
        ("The shop is “Blue Bottle Cafe”.", ("Latte 2 x 18.00 36.00", "Thank you")),  # nothing like it
        ("The shop is “Blue Bottle Cafe”.", ("BLUE B0TTLE CAFE",)),  # the same up to OCR look-alikes
        ("The shop is “Blue Bottle Cafe”.", ("8LUE BOTTLE CAF",)),  # the same up to OCR noise
    ],
)
def test_a_witness_with_nothing_legible_on_the_claim_is_silent(answer: str, witness: tuple[str, ...]) -> None:
    seen = ("BLUE BOTTLE CAFE", "Date: 2026-03-19", "Total: 90.00")
    assert only(answer, evidence(seen, witness)) == only(answer, evidence(seen))


def test_a_witness_row_read_with_low_confidence_is_not_heard() -> None:
    uncertain = lines(("TOTAL 80.00",), score=0.5)
    assert only("The total is 90.00.", evidence(("Total: 90.00",), uncertain)).verdict == "supported"
    sure = lines(("TOTAL 80.00",), score=0.95)
    assert only("The total is 90.00.", evidence(("Total: 90.00",), sure)).verdict == "contradicted"


def test_the_witness_never_turns_unverifiable_into_a_contradiction() -> None:
    check = only("The total is 90.00.", evidence(("BLUE BOTTLE CAFE", "Tax 3.06"), ("TOTAL 80.00",)))
    assert (check.verdict, check.witness) == ("unverifiable", None)


def test_a_vision_contradiction_stays_the_vision_stages_own() -> None:
    seen = evidence(EN_MISREAD, EN_TRUE)
    check = only("The total is 70.00.", seen)
    assert (check.verdict, check.witness) == ("contradicted", None)
    assert check.evidence is not None
    assert check.evidence.text == "Total: 90.00"


def test_the_witness_weighs_fields_and_model_sentences_too() -> None:
    fields = evidence((), ("TOTAL 80.00",), fields=(KeyValue("Total", "90.00"),))
    assert only("The total is 90.00.", fields).verdict == "contradicted"


def test_with_two_dates_only_the_claims_own_row_counts() -> None:
    seen = ("Issued 2026-03-19", "Due 2026-04-30")
    witness = ("Issued 2026-03-14", "Due 2026-04-30")
    assert only("It was issued on 2026-03-19.", evidence(seen, witness)).verdict == "contradicted"
    assert only("The due date is 2026-04-30.", evidence(seen, witness)).verdict == "supported"


def test_a_time_is_cross_examined_like_a_date() -> None:
    seen, witness = ("2026-03-14 12:47",), ("2026-03-14 12:41",)
    check = only("It was paid at 12:47.", evidence(seen, witness))
    assert check.verdict == "contradicted"
    assert check.witness is not None
    assert "12:41" in check.reason
    assert only("It was paid at 12:47.", evidence(seen, seen)).verdict == "supported"


def test_the_witness_is_kept_apart_from_the_vision_evidence() -> None:
    both = evidence(EN_MISREAD, EN_TRUE)
    assert all(item.source == "text" for item in both.items)
    assert [item.text for item in both.witness] == list(EN_TRUE)
    assert all(item.source == "witness" for item in both.witness)


@pytest.mark.parametrize(
    ("language", "expected"),
    [("en", ("TOTAL 80.00", "Total: 90.00", "OCR")), ("zh", ("TOTAL 80.00", "Total: 90.00", "文字识别"))],
)
def test_the_correction_and_the_notice_state_both_readings(language: Language, expected: tuple[str, ...]) -> None:
    (check,) = verify_all(extract_claims("The total is 90.00.", "en"), evidence(EN_MISREAD, EN_TRUE))
    decision = decide([check], profile="general", confidence=0.6, language=language)
    assert decision.status == "contradicted"
    for text in (correction_prompt([check], language), conflict_notice([check], language)):
        assert all(part in text for part in expected)


def test_evidence_quality_counts_the_witness_row_the_check_cites() -> None:
    vision_row = EvidenceItem("text", "Total: 90.00", "line 5", 1.0)
    witness_row = EvidenceItem("witness", "TOTAL 80.00", "witness line 5", 0.8)
    claim = extract_claims("The total is 90.00.", "en")[0]
    check = Check(claim, "contradicted", "the OCR witness read otherwise", vision_row, witness_row)
    assert evidence_quality(Evidence("glm", (vision_row,)), [check]) == pytest.approx(0.9)
