"""Writes the embedded LLM's own answers about the arbitration cases' images, for `bench/arbitration_eval.py` to
judge beside its templated answers. Run once; the answers are stored with the tests, and their labels (which
claims are true) are a person's, added by hand.

    .venv/bin/python -m bench.llm_answers [--seed 7] [--count 40] [--out tests/data/llm_answers.jsonl]

For each English case of `bench/arbitration_cases.py` (the embedded LLM, SmolLM2-135M, writes English only) it
reads the image with the embedded `ocr` vision backend (`describe`), builds the reasoning prompt the pipeline builds
(`orchestrator.analysis.prompts.reasoning_messages`, profile `general`), and asks the embedded LLM, greedily, for at
most 64 new tokens; up to `--count` cases, taken in turn from each family. Each line written: the case's family,
seed and index, the question, the text drawn on the image, the description the LLM read, the answer it wrote, and
the claims `extract_claims` finds in it, each labelled (`true`) from the text drawn on the image, never from what the
OCR read nor from the arbiter's verdicts (`label`):

- a number, date or time is true when the image shows that value, false when it does not;
- a quote is true when the image's text holds it (compared compacted), false when it does not;
- null (not a claim about the image, left out of the rates) for a number or quote found only in the description's
  own bookkeeping ("relevance 0.72", "line 7 of 8"), for a list's item numbers, and for claims about objects and
  counts, which these images do not settle.

A person then reads each answer and corrects a label where the rule is wrong (a value the answer computed
correctly is true); `"checked": true` on a line says that was done.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from itertools import chain, zip_longest
from pathlib import Path

from bench.arbitration_cases import generate
from orchestrator.analysis.messages import detect_language
from orchestrator.analysis.prompts import reasoning_messages
from orchestrator.arbitration.claim_values import find_dates, find_numbers, find_times, parse_number
from orchestrator.arbitration.claims import Claim, extract_claims
from orchestrator.arbitration.evidence import compact
from reasoning_stage.local import LocalReasoningBackend
from reasoning_stage.types import ReasoningRequest
from vision_stage.images import ImageLimits, decode_image
from vision_stage.ocr import OcrVisionBackend
from vision_stage.types import VisionRequest

_QUOTED = re.compile(r"“[^”]*”")
_ITEM = re.compile(r"\s*\d+\.")
ENGLISH = frozenset({"receipt_en", "price_list", "form", "sign"})
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "llm_answers.jsonl"


async def write(seed: int, count: int, out: Path) -> None:
    english = [(index, case) for index, case in enumerate(generate(seed))
               if case.family in ENGLISH and detect_language(case.question) == "en"]  # fmt: skip
    families = [[pair for pair in english if pair[1].family == family] for family in sorted(ENGLISH)]
    cases = [pair for pair in chain.from_iterable(zip_longest(*families)) if pair is not None][:count]
    vision = await OcrVisionBackend.load(tags=False)
    reasoning = await LocalReasoningBackend.load(None)
    lines = []
    try:
        for index, case in cases:
            image = decode_image(case.png, ImageLimits())
            seen = await vision.generate(VisionRequest(image, case.question, task="describe"))
            messages = reasoning_messages(seen, case.question, "general", "en")
            result = await reasoning.generate(ReasoningRequest(messages, max_new_tokens=64, temperature=0.0))
            claims = [
                {"kind": claim.kind, "text": claim.text, "value": claim.value, "referent": claim.referent,
                 "true": label(claim, case.lines, seen.description, result.text)}
                for claim in extract_claims(result.text, "en")
            ]  # fmt: skip
            lines.append({"family": case.family, "seed": seed, "index": index, "question": case.question,
                          "drawn": list(case.lines), "description": seen.description, "answer": result.text,
                          "claims": claims, "checked": False})  # fmt: skip
            print(f"{case.family} #{index}: {result.text[:100]!r} ({len(claims)} claims)")
    finally:
        await vision.aclose()
        await reasoning.aclose()
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    await asyncio.to_thread(out.write_text, text, encoding="utf-8")
    print(f"wrote {len(lines)} answers to {out}")


def label(claim: Claim, drawn: tuple[str, ...], description: str, answer: str) -> bool | None:
    """Whether `claim` is true of the image whose text is `drawn` (module docstring); None: not about the image.
    The description's bookkeeping is what it says besides the quoted text it read; a list's item number ("2." at the
    start of a line of the answer) is no claim either."""
    description = _QUOTED.sub(" ", description)
    start, end = claim.span
    if claim.kind == "number" and _ITEM.fullmatch(answer[_line_start(answer, start) : end + 1]):
        return None
    if claim.kind == "number":
        value = parse_number(claim.value)
        shown = {mention.value for line in drawn for mention in find_numbers(line)}
        if value in shown:
            return True
        described = {mention.value for mention in find_numbers(description)}
        return None if value in described else False
    if claim.kind in ("date", "time"):
        finder = find_dates if claim.kind == "date" else find_times
        said = {reading for _, reading in finder(claim.text)}
        return bool(said & {reading for line in drawn for _, reading in finder(line)}) if said else None
    if claim.kind == "quote":
        quote = compact(claim.value)
        if quote in compact(" ".join(drawn)):
            return True
        return None if quote in compact(description) else False
    return None


def _line_start(text: str, index: int) -> int:
    return text.rfind("\n", 0, index) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    asyncio.run(write(args.seed, args.count, args.out))


if __name__ == "__main__":
    main()
