"""The arbitration decision: every resolution path, the messages users read, and how confidence moves."""

from __future__ import annotations

import pytest

from orchestrator.analysis.messages import Profile
from orchestrator.arbitration.claims import Claim
from orchestrator.arbitration.decision import (
    PROFILE_BARS,
    confidence,
    conflict_notice,
    correction_prompt,
    decide,
    evidence_quality,
    resolve,
)
from orchestrator.arbitration.evidence import Evidence, EvidenceItem
from orchestrator.arbitration.verification import Check, Verdict

TOTAL_LINE = EvidenceItem("text", "TOTAL 54.06", "line 8", 0.99)


def check(verdict: Verdict, text: str = "51.00", evidence: EvidenceItem | None = TOTAL_LINE) -> Check:
    claim = Claim("number", text, text, referent="total")
    return Check(claim, verdict, f"{verdict} because", evidence)


SUPPORTED, CONTRADICTED, UNVERIFIABLE = check("supported", "54.06"), check("contradicted"), check("unverifiable")


def test_all_supported_in_general_profile_is_agreed() -> None:
    decision = decide([SUPPORTED], profile="general", confidence=0.9, language="en")
    assert (decision.status, decision.needs_human_review, decision.correction_prompt) == ("agreed", False, None)


def test_nothing_checkable_is_agreed() -> None:
    assert decide([], profile="general", confidence=0.7, language="en").status == "agreed"


def test_contradiction_asks_for_a_correction_stating_the_evidence() -> None:
    decision = decide([SUPPORTED, CONTRADICTED], profile="general", confidence=0.6, language="en")
    assert decision.status == "contradicted"
    assert decision.contradictions == (CONTRADICTED,)
    prompt = decision.correction_prompt or ""
    assert "“51.00”" in prompt
    assert "TOTAL 54.06" in prompt
    assert "line 8" in prompt


def test_correction_prompt_and_notice_speak_chinese_to_a_chinese_question() -> None:
    prompt = correction_prompt([CONTRADICTED], "zh")
    assert "你写了“51.00”" in prompt
    assert "第8行" in prompt
    assert "TOTAL 54.06" in prompt
    notice = conflict_notice([CONTRADICTED], "zh")
    assert "与图像不符" in notice
    assert "TOTAL 54.06" in notice


def test_clean_second_answer_is_corrected() -> None:
    first = decide([CONTRADICTED], profile="general", confidence=0.4, language="en")
    final = resolve(first, [SUPPORTED], profile="general", confidence=0.9, language="en")
    assert (final.status, final.corrected, final.needs_human_review, final.notice) == ("corrected", True, False, None)
    assert final.checks == (SUPPORTED,)


def test_second_answer_still_contradicting_is_returned_with_the_conflict_spelled_out() -> None:
    first = decide([CONTRADICTED], profile="general", confidence=0.4, language="en")
    final = resolve(first, [CONTRADICTED], profile="general", confidence=0.4, language="en")
    assert (final.status, final.needs_human_review) == ("needs_review", True)
    assert final.notice is not None
    assert "“51.00”" in final.notice
    assert "TOTAL 54.06" in final.notice


@pytest.mark.parametrize("profile", ["medical", "legal"])
def test_medical_and_legal_answers_always_need_review(profile: Profile) -> None:
    decision = decide([SUPPORTED], profile=profile, confidence=0.99, language="en")
    assert (decision.status, decision.needs_human_review) == ("needs_review", True)
    first = decide([CONTRADICTED], profile=profile, confidence=0.99, language="en")
    final = resolve(first, [SUPPORTED], profile=profile, confidence=0.99, language="en")
    assert (final.status, final.corrected, final.needs_human_review) == ("needs_review", True, True)


def test_confidence_below_the_profile_bar_needs_review() -> None:
    bar = PROFILE_BARS["finance"]
    assert decide([SUPPORTED], profile="finance", confidence=bar - 0.01, language="en").status == "needs_review"
    assert decide([SUPPORTED], profile="finance", confidence=bar, language="en").status == "agreed"
    assert decide([SUPPORTED], profile="general", confidence=bar - 0.01, language="en").status == "agreed"


def score(checks: list[Check], quality: float = 0.95, route: float | None = 0.9) -> float:
    return confidence(checks, evidence_quality=quality, route_score=route, route_threshold=0.5)


def test_more_contradictions_lower_confidence() -> None:
    values = [score([SUPPORTED, SUPPORTED] + [CONTRADICTED] * n) for n in range(4)]
    assert values == sorted(values, reverse=True)
    assert len(set(values)) == 4


def test_more_support_and_better_evidence_raise_confidence() -> None:
    assert score([SUPPORTED, UNVERIFIABLE]) > score([UNVERIFIABLE, UNVERIFIABLE])
    assert score([SUPPORTED], quality=0.99) > score([SUPPORTED], quality=0.6)


def test_routing_certainty_counts_distance_from_the_threshold() -> None:
    assert score([SUPPORTED], route=0.95) > score([SUPPORTED], route=0.55)
    assert score([SUPPORTED], route=None) >= score([SUPPORTED], route=1.0)


def test_confidence_is_bounded_and_a_clean_well_read_answer_clears_the_general_bar() -> None:
    assert 0.0 <= score([CONTRADICTED] * 5, quality=0.0, route=0.5) < PROFILE_BARS["general"]
    assert PROFILE_BARS["general"] < score([SUPPORTED] * 3) <= 1.0


def test_evidence_quality_uses_the_ocr_scores_of_the_lines_cited() -> None:
    blurry = EvidenceItem("text", "T0TAL 54.O6", "line 3", 0.55)
    sharp = EvidenceItem("text", "Tax 3.06", "line 2", 0.99)
    evidence = Evidence("ocr", (blurry, sharp))
    assert evidence_quality(evidence, [check("supported", evidence=blurry)]) == pytest.approx(0.55)
    assert evidence_quality(evidence, []) == pytest.approx(0.77)
    assert evidence_quality(Evidence("ocr", ()), []) == 0.5
