"""How well claim checking catches an LLM answer that contradicts the image, against a naive baseline, in one run.

    .venv/bin/python -m bench.arbitration_eval [--seed 7] [--scale 1.0]

Renders the seeded cases of `bench/arbitration_cases.py` (190 images at scale 1), runs the real embedded `ocr`
vision backend (RapidOCR, no tags) on each image once, and judges both of its answers — one consistent with the
image, one with exactly one injected contradiction — two ways:

- ours: `extract_claims` → `verify_all` against `evidence_from_vision`; flagged when any check is `contradicted`;
- baseline: flagged when any number in the answer is missing from the OCR text (spaces and commas ignored).

It prints, per family and overall, the share of contradicted answers caught and of consistent answers wrongly
flagged, side by side, plus the time spent reading images and checking claims. `scene_objects` (errors about people
in images without text) is out of reach of a text-reading backend by design and is reported apart from the totals.
Then, apart, the same rates on the embedded LLM's own answers about the same images (`bench/arbitration_llm.py`;
seed 7 at scale 1 only).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from collections import defaultdict
from dataclasses import dataclass

from bench import arbitration_llm
from bench.arbitration_cases import Case, generate
from orchestrator.analysis.messages import detect_language
from orchestrator.arbitration.claims import extract_claims
from orchestrator.arbitration.evidence import evidence_from_vision
from orchestrator.arbitration.verification import Check, verify_all
from vision_stage.images import ImageLimits, decode_image
from vision_stage.ocr import OcrVisionBackend
from vision_stage.types import VisionRequest, VisionResult

OUT_OF_REACH = frozenset({"scene_objects"})
TARGET_CAUGHT, TARGET_FALSE = 0.95, 0.05


@dataclass
class Tally:
    cases: int = 0
    ours_caught: int = 0
    ours_false: int = 0
    base_caught: int = 0
    base_false: int = 0


def ours(answer: str, vision: VisionResult) -> tuple[bool, tuple[Check, ...]]:
    checks = verify_all(extract_claims(answer, detect_language(answer)), evidence_from_vision(vision))
    return any(check.verdict == "contradicted" for check in checks), checks


def baseline(answer: str, vision: VisionResult) -> bool:
    seen = "".join(line.text for line in vision.structured.text_lines).replace(" ", "").replace(",", "")
    return any(number not in seen for number in re.findall(r"\d+(?:\.\d+)?", answer.replace(",", "")))


async def read_all(cases: list[Case]) -> list[VisionResult]:
    backend = await OcrVisionBackend.load(tags=False)
    try:
        limits = ImageLimits()
        return [
            await backend.generate(VisionRequest(decode_image(case.png, limits), case.question, task="describe"))
            for case in cases
        ]
    finally:
        await backend.aclose()


def judge(cases: list[Case], results: list[VisionResult], verbose: bool) -> dict[str, Tally]:
    tallies: dict[str, Tally] = defaultdict(Tally)
    for case, vision in zip(cases, results, strict=True):
        tally = tallies[case.family]
        tally.cases += 1
        false_flag, clean_checks = ours(case.consistent, vision)
        caught, bad_checks = ours(case.contradicted, vision)
        tally.ours_false += false_flag
        tally.ours_caught += caught
        tally.base_false += baseline(case.consistent, vision)
        tally.base_caught += baseline(case.contradicted, vision)
        if verbose and (false_flag or not caught):
            print(f"-- {case.family} ({case.injected}) {'FALSE FLAG' if false_flag else 'MISSED'}")
            print(
                "   image:",
                " | ".join(line.text for line in sorted(vision.structured.text_lines, key=lambda x: x.order)),
            )
            for check in clean_checks if false_flag else bad_checks:
                print(f"   {check.verdict:12} {check.claim.kind:7} {check.claim.text!r}: {check.reason}")
    return tallies


def _row(name: str, tally: Tally) -> str:
    n = max(tally.cases, 1)
    return (f"{name:16} {tally.cases:5}  {tally.ours_caught / n:8.1%} {tally.base_caught / n:9.1%}   "
            f"{tally.ours_false / n:8.1%} {tally.base_false / n:9.1%}")  # fmt: skip


def report(tallies: dict[str, Tally]) -> Tally:
    print(f"{'family':16} {'cases':>5}  {'caught':>8} {'baseline':>9}   {'false':>8} {'baseline':>9}")
    total = Tally()
    for family, tally in tallies.items():
        print(_row(family + (" *" if family in OUT_OF_REACH else ""), tally))
        if family not in OUT_OF_REACH:
            for key in vars(total):
                setattr(total, key, getattr(total, key) + getattr(tally, key))
    print(_row("overall", total))
    print("* out of reach of the ocr backend (it cannot see people); not in the overall figures")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the number of images per family")
    parser.add_argument("--verbose", action="store_true", help="print every miss and false flag")
    args = parser.parse_args()
    started = time.perf_counter()
    cases = generate(args.seed, args.scale)
    rendered = time.perf_counter()
    results = asyncio.run(read_all(cases))
    read = time.perf_counter()
    tallies = judge(cases, results, args.verbose)
    judged = time.perf_counter()
    print(f"{len(cases)} images, {2 * len(cases)} answers, seed {args.seed}")
    total = report(tallies)
    n = max(total.cases, 1)
    met = total.ours_caught / n >= TARGET_CAUGHT and total.ours_false / n <= TARGET_FALSE
    print(f"targets (caught ≥ {TARGET_CAUGHT:.0%}, false flags ≤ {TARGET_FALSE:.0%}): {'met' if met else 'NOT met'}")
    stored = arbitration_llm.load()
    if args.scale == 1.0 and all(answer["seed"] == args.seed for answer in stored):
        print(arbitration_llm.report(arbitration_llm.judge(stored, dict(enumerate(results)))))
    else:
        print(f"the embedded LLM's own answers are about the images of seed {stored[0]['seed']} at scale 1: not judged")
    print(f"time: render {rendered - started:.1f} s, ocr {read - rendered:.1f} s "
          f"({(read - rendered) / len(cases) * 1000:.0f} ms/image), claims+checks {(judged - read) * 1000:.0f} ms "
          f"({(judged - read) / (2 * len(cases)) * 1000:.2f} ms/answer)")  # fmt: skip


if __name__ == "__main__":
    main()
