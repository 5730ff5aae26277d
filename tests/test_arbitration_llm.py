"""Claim checking on the embedded LLM's own answers (`tests/data/llm_answers.jsonl`, `bench/arbitration_llm.py`):
the stored file is consistent with the claim extractor and its labels, and judged against the real OCR reading of
the same images, every answer with a false claim is caught and no answer whose claims are all true is flagged."""

from __future__ import annotations

import asyncio

import pytest

from bench import arbitration_llm
from bench.arbitration_cases import generate
from orchestrator.arbitration.claims import extract_claims
from vision_stage.images import ImageLimits, decode_image
from vision_stage.ocr import OcrVisionBackend
from vision_stage.types import VisionRequest, VisionResult


def test_the_stored_answers_are_labelled_by_hand_and_their_claims_are_the_extractors() -> None:
    answers = arbitration_llm.load()
    assert len(answers) == 40
    assert all(answer["checked"] for answer in answers)
    for answer in answers:
        found = [(claim.kind, claim.value) for claim in extract_claims(answer["answer"], "en")]
        assert found == [(claim["kind"], claim["value"]) for claim in answer["claims"]], answer["index"]
        assert all(claim["true"] in (True, False, None) for claim in answer["claims"])
    labels = [claim["true"] for answer in answers for claim in answer["claims"]]
    assert labels.count(False) == 3
    assert labels.count(True) == 40


async def read(indices: set[int]) -> dict[int, VisionResult]:
    cases = generate(7)
    backend = await OcrVisionBackend.load(tags=False)
    try:
        return {
            index: await backend.generate(
                VisionRequest(decode_image(cases[index].png, ImageLimits()), cases[index].question, task="describe")
            )
            for index in sorted(indices)
        }
    finally:
        await backend.aclose()


@pytest.mark.slow
def test_the_embedded_llms_false_claims_are_caught_and_its_true_ones_left_alone() -> None:
    answers = arbitration_llm.load()
    labelled = [answer for answer in answers if any(claim["true"] is not None for claim in answer["claims"])]
    visions = asyncio.run(read({answer["index"] for answer in labelled}))
    tally = arbitration_llm.judge(labelled, visions)
    assert (tally.with_false, tally.caught, tally.misses) == (3, 3, [])
    assert (tally.all_true, tally.false_flags) == (16, 0)
    assert (tally.false_claims, tally.false_contradicted) == (3, 3)
    assert (tally.true_claims, tally.true_contradicted) == (40, 0)
    assert "answers with a false claim caught   3/3 (100.0%)" in arbitration_llm.report(tally)
