"""Claim checking on the embedded LLM's own answers (`tests/data/llm_answers.jsonl`, written by `bench/llm_answers.py`,
labelled by hand), judged against the same OCR reading of each image as the templated answers
(`bench/arbitration_eval.py` prints it beside them).

- An answer with a false claim is *caught* when any of its checks is `contradicted`; an answer whose labelled claims
  are all true is *wrongly flagged* when any is. Answers without a labelled claim (no claim about the image) are
  counted apart.
- Per claim: the share of false claims contradicted, and of true claims contradicted.

The claims are found again in each answer with `extract_claims`; they must be the stored ones, in order (else the
stored labels would name other claims, and the file is to be written again).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.arbitration.claims import extract_claims
from orchestrator.arbitration.evidence import evidence_from_vision
from orchestrator.arbitration.verification import Check, verify_all
from vision_stage.types import VisionResult

ANSWERS = Path(__file__).resolve().parents[1] / "tests" / "data" / "llm_answers.jsonl"


@dataclass
class LlmTally:
    answers: int = 0
    unlabelled: int = 0
    with_false: int = 0
    caught: int = 0
    all_true: int = 0
    false_flags: int = 0
    false_claims: int = 0
    false_contradicted: int = 0
    true_claims: int = 0
    true_contradicted: int = 0
    misses: list[str] = field(default_factory=list)


def load(path: Path = ANSWERS) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def checks_of(answer: dict[str, Any], vision: VisionResult) -> tuple[Check, ...]:
    """The checks of a stored answer's claims, which must be the stored ones (module docstring)."""
    claims = extract_claims(answer["answer"], "en")
    found = [(claim.kind, claim.value) for claim in claims]
    stored = [(claim["kind"], claim["value"]) for claim in answer["claims"]]
    if found != stored:
        raise ValueError(f"{answer['family']} #{answer['index']}: the claims found now differ from the stored ones")
    return verify_all(claims, evidence_from_vision(vision))


def judge(answers: list[dict[str, Any]], visions: dict[int, VisionResult]) -> LlmTally:
    """Every stored answer judged against its image's reading (`visions`, by the case's index)."""
    tally = LlmTally()
    for answer in answers:
        tally.answers += 1
        checks = checks_of(answer, visions[answer["index"]])
        labelled = [(claim["true"], check) for claim, check in zip(answer["claims"], checks, strict=True)
                    if claim["true"] is not None]  # fmt: skip
        if not labelled:
            tally.unlabelled += 1
            continue
        flagged = any(check.verdict == "contradicted" for check in checks)
        for true, check in labelled:
            contradicted = check.verdict == "contradicted"
            if true:
                tally.true_claims += 1
                tally.true_contradicted += contradicted
            else:
                tally.false_claims += 1
                tally.false_contradicted += contradicted
        if all(true for true, _ in labelled):
            tally.all_true += 1
            tally.false_flags += flagged
        else:
            tally.with_false += 1
            tally.caught += flagged
            if not flagged:
                tally.misses.append(f"{answer['family']} #{answer['index']}")
    return tally


def report(tally: LlmTally) -> str:
    def share(part: int, whole: int) -> str:
        return f"{part}/{whole} ({part / whole:.1%})" if whole else "0/0"

    return "\n".join((
        f"the embedded LLM's own answers ({tally.answers}; {tally.unlabelled} make no claim about the image):",
        f"  answers with a false claim caught   {share(tally.caught, tally.with_false)}",
        f"  answers all true, wrongly flagged    {share(tally.false_flags, tally.all_true)}",
        f"  false claims contradicted            {share(tally.false_contradicted, tally.false_claims)}",
        f"  true claims contradicted             {share(tally.true_contradicted, tally.true_claims)}",
        *([f"  missed: {', '.join(tally.misses)}"] if tally.misses else []),
    ))  # fmt: skip
