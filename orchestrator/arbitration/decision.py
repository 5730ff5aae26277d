"""Deciding what to do with a reasoning answer once its claims are checked. Pure functions over frozen data.

The flow, for the pipeline to drive (it owns the I/O):

1. `decide(checks, profile=…, confidence=…, language=…)` on the first answer. No contradiction → `agreed`. Any
   contradiction → `contradicted`, with `correction_prompt`: the follow-up message that re-asks the reasoning stage
   once, stating each contradiction and its evidence in the question's language.
2. After the second answer is checked, `resolve(first, second_checks, …)`: no contradiction left → `corrected`;
   some left → `needs_review`, with `notice` spelling the conflicts out (the second answer is returned with it).
3. Either way, a `medical` or `legal` profile, or a confidence below the profile's bar (`PROFILE_BARS`), turns the
   status into `needs_review` and sets `needs_human_review`; `corrected` stays true when the answer was corrected.

`confidence(checks, evidence_quality=…, route_score=…, route_threshold=…)` is the number reported with the answer:

    confidence = 0.3 * Q + 0.5 * V + 0.2 * R                      (rounded to 3 places, in [0, 1])

- Q, evidence quality in [0, 1]: `evidence_quality(evidence, checks)`: the mean OCR score of the rows the checks
  cite (a check the witness contradicted cites two: the vision stage's and the witness's), or of the vision stage's
  rows when no check cites one; items without a score (fields, objects, a model's sentences) count
  `MODEL_EVIDENCE_SCORE`; no evidence at all counts 0.5.
- V, verification in [0, 1]: (S + 0.5·U) / (S + U + 2·C) for S supported, U unverifiable and C contradicted checks
  (a contradiction weighs twice); no checks → `NO_CLAIMS_VERIFICATION` (nothing concrete was said, so nothing was
  confirmed either). A claim the OCR witness contradicts (`orchestrator.arbitration.verification`: it read
  otherwise what the vision stage read) counts in C like any other contradiction; a witness that agrees or has
  nothing to say changes nothing.
- R, routing certainty in [0, 1]: |route_score − route_threshold| / max(route_threshold, 1 − route_threshold), the
  route score's distance from the threshold relative to the largest possible distance; a route forced by the client
  passes `route_score=None` and counts 1.

So more contradictions always lower it, and more supported claims or better-read evidence always raise it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from orchestrator.analysis.messages import REVIEW_PROFILES, Language, Profile
from orchestrator.analysis.prompts import inline_data
from orchestrator.arbitration.evidence import Evidence
from orchestrator.arbitration.verification import Check

Status = Literal["agreed", "contradicted", "corrected", "needs_review"]

PROFILE_BARS: dict[Profile, float] = {"general": 0.5, "finance": 0.6, "medical": 0.75, "legal": 0.75}
"""The confidence below which an answer needs human review."""
WEIGHTS = (0.3, 0.5, 0.2)
"""Of evidence quality, verification and routing certainty."""
MODEL_EVIDENCE_SCORE = 0.9
NO_CLAIMS_VERIFICATION = 0.6


@dataclass(frozen=True)
class Arbitration:
    """What was decided about an answer, and why.

    `status`: `agreed`, `contradicted` (re-ask once with `correction_prompt`), `corrected` or `needs_review`;
    `corrected` is true when a second answer replaced the first; `notice` is the conflict spelled out for the user
    when contradictions remain.
    """

    status: Status
    checks: tuple[Check, ...]
    confidence: float
    needs_human_review: bool
    corrected: bool = False
    correction_prompt: str | None = None
    notice: str | None = None

    @property
    def contradictions(self) -> tuple[Check, ...]:
        return tuple(check for check in self.checks if check.verdict == "contradicted")


def evidence_quality(evidence: Evidence, checks: Sequence[Check]) -> float:
    """Q of the module docstring."""
    cited = [item for check in checks for item in (check.evidence, check.witness) if item is not None]
    pool = cited or list(evidence.items)
    if not pool:
        return 0.5
    scores = [item.score if item.score is not None else MODEL_EVIDENCE_SCORE for item in pool]
    return sum(scores) / len(scores)


def verification_score(checks: Sequence[Check]) -> float:
    """V of the module docstring."""
    if not checks:
        return NO_CLAIMS_VERIFICATION
    supported = sum(check.verdict == "supported" for check in checks)
    unverifiable = sum(check.verdict == "unverifiable" for check in checks)
    contradicted = sum(check.verdict == "contradicted" for check in checks)
    return (supported + 0.5 * unverifiable) / (supported + unverifiable + 2 * contradicted)


def routing_certainty(route_score: float | None, route_threshold: float) -> float:
    """R of the module docstring."""
    if route_score is None:
        return 1.0
    widest = max(route_threshold, 1.0 - route_threshold)
    return min(1.0, abs(route_score - route_threshold) / widest) if widest > 0 else 1.0


def confidence(
    checks: Sequence[Check], *, evidence_quality: float, route_score: float | None, route_threshold: float = 0.5
) -> float:
    """The answer's confidence in [0, 1] (module docstring)."""
    q, v, r = (
        max(0.0, min(1.0, evidence_quality)),
        verification_score(checks),
        routing_certainty(route_score, route_threshold),
    )
    weight_q, weight_v, weight_r = WEIGHTS
    return round(max(0.0, min(1.0, weight_q * q + weight_v * v + weight_r * r)), 3)


def decide(checks: Sequence[Check], *, profile: Profile, confidence: float, language: Language) -> Arbitration:
    """The decision on a first answer (step 1 of the module docstring)."""
    checks = tuple(checks)
    review = needs_review(profile, confidence)
    contradictions = [check for check in checks if check.verdict == "contradicted"]
    if contradictions:
        prompt = correction_prompt(contradictions, language)
        return Arbitration("contradicted", checks, confidence, review, correction_prompt=prompt)
    return Arbitration("needs_review" if review else "agreed", checks, confidence, review)


def resolve(
    first: Arbitration, second_checks: Sequence[Check], *, profile: Profile, confidence: float, language: Language
) -> Arbitration:
    """The decision once the re-asked answer is checked (step 2): `corrected`, or `needs_review` with a notice."""
    checks = tuple(second_checks)
    review = needs_review(profile, confidence)
    remaining = [check for check in checks if check.verdict == "contradicted"]
    if remaining:
        text = conflict_notice(remaining, language)
        return Arbitration("needs_review", checks, confidence, True, corrected=True, notice=text)
    status: Status = "needs_review" if review else "corrected"
    return replace(first, status=status, checks=checks, confidence=confidence, needs_human_review=review,
                   corrected=True, correction_prompt=None)  # fmt: skip


def needs_review(profile: Profile, confidence: float) -> bool:
    return profile in REVIEW_PROFILES or confidence < PROFILE_BARS[profile]


def _evidence_phrase(check: Check, language: Language, quote: Callable[[str], str] = str) -> str:
    """The evidence against a claim in a sentence; `quote` makes what the image (or a model) wrote safe to quote."""
    if check.evidence is None:
        return quote(check.reason)
    where, text = quote(check.evidence.where), quote(check.evidence.text)
    if check.witness is not None:  # the vision stage read the claim; the OCR witness read otherwise
        read, witness_where = quote(check.witness.text), quote(check.witness.where)
        if language == "zh":
            return f"文字识别复核图中{_where_zh(witness_where)}为“{read}”，而视觉模型读作“{text}”（{_where_zh(where)}）"
        return (
            f"a second reading of the image by OCR reads “{read}” ({witness_where}), "
            f"where the vision model read “{text}” ({where})"
        )
    if check.evidence.source == "probe":  # `where` is the question put to the vision stage, `text` its reply
        if language == "zh":
            return f"问视觉模型“{where}”，它答“{text}”"
        return f"asked “{where}”, the vision model answered “{text}”"
    if language == "zh":
        return f"图中{_where_zh(where)}为“{text}”"
    return f"the image's {where} reads “{text}”"


def _where_zh(where: str) -> str:
    if where.startswith("witness line "):
        return f"第{where.removeprefix('witness line ')}行"
    if where.startswith("line "):
        return f"第{where.removeprefix('line ')}行"
    return {"caption": "说明", "answer": "回答", "description": "描述"}.get(where, where)


def correction_prompt(contradictions: Sequence[Check], language: Language) -> str:
    """The follow-up user message re-asking the reasoning stage, one line per contradiction with its evidence. What
    the answer and the image wrote is quoted as data (`orchestrator.analysis.prompts.inline_data`): an image's text
    cannot end its quotation, break the line or pose as a turn."""
    q = inline_data
    if language == "zh":
        lines = ["你的回答与图像描述不一致："]
        lines += [
            f"{i}. 你写了“{q(c.claim.text)}”，但{_evidence_phrase(c, 'zh', q)}。"
            for i, c in enumerate(contradictions, 1)
        ]
        lines.append("请只依据图像描述重新回答原问题，更正以上内容；看不清的请直接说明。")
        return "\n".join(lines)
    lines = ["Your answer disagrees with the image description:"]
    lines += [
        f"{i}. You wrote “{q(c.claim.text)}”, but {_evidence_phrase(c, 'en', q)}."
        for i, c in enumerate(contradictions, 1)
    ]
    lines.append("Answer the original question again from the image description only, correcting these points; "
                 "say so where the description does not tell.")  # fmt: skip
    return "\n".join(lines)


def conflict_notice(contradictions: Sequence[Check], language: Language) -> str:
    """The notice returned with an answer that still contradicts the image after one correction."""
    if language == "zh":
        parts = [f"回答中的“{c.claim.text}”与图像不符（{_evidence_phrase(c, 'zh')}）" for c in contradictions]
        return "注意：" + "；".join(parts) + "。请以图像为准，并建议人工复核。"
    parts = [
        f"“{c.claim.text}” in the answer conflicts with the image ({_evidence_phrase(c, 'en')})" for c in contradictions
    ]
    return "Caution: " + "; ".join(parts) + ". Trust the image, and have a person review this answer."
