from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from orchestrator.analysis.routing import (
    EN_CUES,
    EmbeddingEvidence,
    EmbeddingRouter,
    KeywordRouter,
    Neighbour,
    Prototype,
    embedding_decision,
    embedding_evidence,
    find_cue,
    keyword_decision,
    load_prototypes,
    routing_window,
)
from orchestrator.api.app import create_app
from orchestrator.settings import RouterSettings, Settings
from orchestrator.wiring import Backends, build_router
from tests.fakes import FakeEmbedder, FakeReasoning, FakeVision
from tests.images import png_bytes

QUESTIONS = Path(__file__).resolve().parent / "data" / "route_questions.jsonl"
REIMBURSE = Neighbour("这张发票能报销吗？", "vision_then_reasoning", 0.91)
TOTAL = Neighbour("What is the total?", "vision_only", 0.84)

# Hand-made 3-d vectors: reasoning examples lie near x, vision examples near y.
PROTOTYPES = (
    Prototype("这张发票能报销吗？", "vision_then_reasoning"),
    Prototype("Is this clause fair?", "vision_then_reasoning"),
    Prototype("这个价格值得买吗？", "vision_then_reasoning"),
    Prototype("What is the total?", "vision_only"),
    Prototype("牌子上写的是什么？", "vision_only"),
    Prototype("How many people are there?", "vision_only"),
)
VECTORS: dict[str, tuple[float, ...]] = {
    "这张发票能报销吗？": (1.0, 0.1, 0.0),
    "Is this clause fair?": (1.0, 0.2, 0.1),
    "这个价格值得买吗？": (1.0, 0.3, 0.0),
    "What is the total?": (0.1, 1.0, 0.0),
    "牌子上写的是什么？": (0.2, 1.0, 0.1),
    "How many people are there?": (0.3, 1.0, 0.0),
    "这张能走公司账吗？": (1.0, 0.0, 0.0),  # no cue, but near the reasoning examples
    "What colour is the car?": (0.0, 1.0, 0.0),
}


def load_questions() -> list[dict[str, str]]:
    return [json.loads(line) for line in QUESTIONS.read_text(encoding="utf-8").splitlines() if line.strip()]


def fake_router(threshold: float = 0.5) -> tuple[EmbeddingRouter, FakeEmbedder]:
    embedder = FakeEmbedder(VECTORS)
    return EmbeddingRouter.build(embedder, PROTOTYPES, threshold), embedder


@pytest.mark.parametrize(
    ("question", "cue"),
    [
        ("为什么这张发票不能报销？", "为什么"),
        ("这种情况怎么办？", "怎么办"),
        ("我应该先付哪一张？", "应该"),
        ("这个价格是否合理？", "是否合理"),
        ("你有什么建议？", "建议"),
        ("不处理会有什么后果？", "后果"),
        ("这个价格买划算吗？", "划算"),
        ("这家店靠谱吗？", "靠谱"),
        ("Why is the total higher than the subtotal?", "why"),
        ("Should I pay this bill now?", "should"),
        ("Explain this chart.", "explain"),
        ("Is it safe to eat this?", "safe to"),
        ("Will they reimburse a taxi?", "reimburs"),
        ("Is this a scam?", "scam"),
    ],
)
def test_reasoning_cues_route_to_reasoning_with_the_cue_named(question: str, cue: str) -> None:
    decision = keyword_decision(question)
    assert decision.decision == "vision_then_reasoning"
    assert f"reasoning cue “{cue}”" in decision.reason
    assert decision.score == 1.0
    assert not decision.forced


@pytest.mark.parametrize(
    "question",
    [
        "What is the total?",
        "这张小票一共多少钱？",
        "What text is on the sign?",
        "图中有几个人？",
        "Read the date.",
        "Is it a cat?",  # "is it" used perceptually: not a cue
        "是红色的吗？",
        "Are they wearing helmets?",
        "What does the safety notice say?",  # "safe to", not "safety"
        "有效期到哪天？",  # "有效吗", not "有效期"
    ],
)
def test_perception_questions_stay_with_the_vision_stage(question: str) -> None:
    decision = keyword_decision(question)
    assert decision.decision == "vision_only"
    assert decision.score == 0.0
    assert "no reasoning cue" in decision.reason


def test_english_cues_match_whole_words_only() -> None:
    assert keyword_decision("What does the asterisk mark?").decision == "vision_only"  # "risk" inside a word
    assert keyword_decision("What is written under Ellsworth?").decision == "vision_only"  # "worth" inside a word
    assert keyword_decision("What is the fairway number?").decision == "vision_only"  # "fair" is not a prefix cue
    assert keyword_decision("What are the risks?").decision == "vision_then_reasoning"  # "risk*" is


async def test_client_mode_overrides_either_router_and_says_so() -> None:
    embedding, embedder = fake_router()
    for router in (KeywordRouter(), embedding):
        forced_vision = await router.route("Why is it so expensive?", "vision")
        assert (forced_vision.decision, forced_vision.forced) == ("vision_only", True)
        assert forced_vision.reason == "mode forced by the client: vision"
        forced_reasoning = await router.route("What is the total?", "reasoning")
        assert (forced_reasoning.decision, forced_reasoning.forced) == ("vision_then_reasoning", True)
        assert forced_reasoning.reason == "mode forced by the client: reasoning"
    assert len(embedder.calls) == 1  # the examples at build time; a forced mode costs no model call


def test_evidence_averages_the_nearest_examples_of_each_label() -> None:
    def unit_at(cosine: float) -> tuple[float, float, float]:  # a unit vector at this cosine to the question's x
        return (cosine, math.sqrt(1 - cosine**2), 0.0)

    cosines = {"r1": 0.9, "r2": 0.8, "r3": 0.7, "r4": 0.1, "v1": 0.6, "v2": 0.5, "v3": 0.4}
    prototypes = [Prototype(name, "vision_then_reasoning" if name[0] == "r" else "vision_only") for name in cosines]
    vectors = np.array([unit_at(c) for c in cosines.values()], dtype=np.float32)
    evidence = embedding_evidence(np.array([1.0, 0.0, 0.0], dtype=np.float32), vectors, prototypes)
    assert evidence.margin == pytest.approx((0.9 + 0.8 + 0.7) / 3 - (0.6 + 0.5 + 0.4) / 3, abs=1e-6)
    assert (evidence.nearest_reasoning.question, evidence.nearest_vision.question) == ("r1", "v1")
    assert evidence.nearest_reasoning.similarity == pytest.approx(0.9, abs=1e-6)
    with pytest.raises(ValueError, match="both labels"):
        embedding_evidence(vectors[0], vectors[:4], prototypes[:4])
    with pytest.raises(ValueError, match="7 prototypes but 3"):
        embedding_evidence(vectors[0], vectors[:3], prototypes)


def test_the_decision_names_the_nearest_examples_and_the_threshold() -> None:
    decision = embedding_decision("这张能走公司账吗？", EmbeddingEvidence(0.01, REIMBURSE, TOTAL), threshold=0.55)
    assert decision.decision == "vision_then_reasoning"
    assert decision.reason == (
        "embedding router: nearest examples “这张发票能报销吗？” (reasoning, 0.91), "
        "“What is the total?” (vision, 0.84); score 0.62 ≥ threshold 0.55"
    )
    stricter = embedding_decision("这张能走公司账吗？", EmbeddingEvidence(0.01, REIMBURSE, TOTAL), threshold=0.7)
    assert stricter.decision == "vision_only"
    assert stricter.reason.startswith("embedding router: nearest examples “What is the total?” (vision, 0.84), “这张")
    assert stricter.reason.endswith("score 0.62 < threshold 0.70")


def test_a_cue_tips_an_undecided_question_but_not_a_plainly_perceptual_one() -> None:
    undecided = EmbeddingEvidence(-0.01, REIMBURSE, TOTAL)
    assert embedding_decision("Can this be paid later?", undecided, 0.55).decision == "vision_only"
    tipped = embedding_decision("Why is this so high?", undecided, 0.55)
    assert tipped.decision == "vision_then_reasoning"
    assert "reasoning cue “why”" in tipped.reason
    clear = EmbeddingEvidence(-0.05, REIMBURSE, TOTAL)
    perceptual = embedding_decision("What does the sign say drivers should do?", clear, 0.55)
    assert perceptual.decision == "vision_only"
    assert "reasoning cue “should”" in perceptual.reason
    assert perceptual.score < 0.55


async def test_the_embedding_router_embeds_the_examples_once_and_each_question_once() -> None:
    router, embedder = fake_router()
    assert embedder.calls == [[p.question for p in PROTOTYPES]]
    reasoning = await router.route("这张能走公司账吗？", "auto")  # no keyword cue: the examples decide
    assert reasoning.decision == "vision_then_reasoning"
    assert "“这张发票能报销吗？” (reasoning, 1.00)" in reasoning.reason
    vision = await router.route("What colour is the car?", "auto")
    assert vision.decision == "vision_only"
    assert 0.0 <= vision.score < 0.5 < reasoning.score <= 1.0
    assert embedder.calls[1:] == ["这张能走公司账吗？", "What colour is the car?"]


async def test_a_repeated_question_is_answered_from_memory_and_the_memory_is_bounded() -> None:
    embedder = FakeEmbedder(VECTORS)
    router = EmbeddingRouter.build(embedder, PROTOTYPES, 0.5, cache_size=2)
    first = await router.route("这张能走公司账吗？", "auto")
    assert await router.route("这张能走公司账吗？", "auto") == first
    assert embedder.calls[1:] == ["这张能走公司账吗？"]
    await router.route("What colour is the car?", "auto")
    await router.route("How many people are there?", "auto")  # pushes the least recent question out
    await router.route("这张能走公司账吗？", "auto")
    seen = ["这张能走公司账吗？", "What colour is the car?", "How many people are there?", "这张能走公司账吗？"]
    assert embedder.calls[1:] == seen
    await router.route("How many people are there?", "auto")  # remembered, and now the most recent
    await router.route("What colour is the car?", "auto")  # pushes out 这张…, not the question just asked again
    await router.route("How many people are there?", "auto")
    assert embedder.calls[1:] == [*seen, "What colour is the car?"]
    off = EmbeddingRouter.build(FakeEmbedder(VECTORS), PROTOTYPES, 0.5, cache_size=0)
    await off.route("What colour is the car?", "auto")
    await off.route("What colour is the car?", "auto")
    assert off._embedder.calls[1:] == ["What colour is the car?"] * 2  # type: ignore[attr-defined]


def test_the_embedding_sees_the_end_of_a_long_question_but_cues_anywhere_count() -> None:
    assert routing_window("What is the total?") == "What is the total?"
    english = "I bought these on a trip last week for the whole team and kept the receipt, what is the total?"
    window = routing_window(english)
    assert english.endswith(window)
    assert 32 <= len(window) <= 48
    assert window.split()[0] in english.split()  # starts at a whole word
    chinese = "我上周出差时为整个团队买了这些东西，还留着小票，一共" * 5 + "多少钱？"
    assert routing_window(chinese) == chinese[-24:]  # a wide character counts twice
    assert routing_window("价格" * 30 + " total?") == "价格" * 10 + " total?"


async def test_a_long_question_is_embedded_by_its_window_and_its_cue_still_counts() -> None:
    router, embedder = fake_router()
    question = "Why " + "and so on " * 30 + "What colour is the car?"
    decision = await router.route(question, "auto")
    assert embedder.calls[1] == routing_window(question)
    assert len(embedder.calls[1]) < len(question)
    assert "reasoning cue “why”" in decision.reason


async def test_the_keyword_setting_builds_a_router_with_nothing_to_load() -> None:
    router = await build_router(RouterSettings(kind="keyword"))
    assert router.name == "keyword"
    assert (await router.route("Why?", "auto")).decision == "vision_then_reasoning"


def test_the_app_routes_with_the_injected_router_and_the_keyword_router_by_default() -> None:
    backends = Backends(FakeVision(), FakeReasoning())
    form = {"question": "这张能走公司账吗？"}
    files = {"image": ("x.png", png_bytes(), "image/png")}
    with TestClient(create_app(Settings(), backends, router=fake_router()[0])) as client:
        body = client.post("/v1/analyze", files=files, data=form).json()
    assert body["mode"] == "vision_then_reasoning"
    assert body["route"]["reason"].startswith("embedding router: nearest examples “这张发票能报销吗？”")
    with TestClient(create_app(Settings(), Backends(FakeVision(), FakeReasoning()))) as client:
        body = client.post("/v1/analyze", files=files, data=form).json()
    assert body["mode"] == "vision_only"
    assert body["route"]["reason"].startswith("keyword router: no reasoning cue")


def test_the_labelled_questions_are_balanced_and_apart_from_the_examples() -> None:
    questions = load_questions()
    assert len(questions) >= 200
    counts = Counter((q["lang"], q["label"], q["split"]) for q in questions)
    assert set(counts.values()) == {30}  # en/zh × vision/reasoning × calibration/test
    prototypes = load_prototypes()
    assert {p.label for p in prototypes} == {"vision_only", "vision_then_reasoning"}
    assert not {q["question"] for q in questions} & {p.question for p in prototypes}


@pytest.mark.slow
async def test_the_embedding_router_routes_at_least_95_percent_of_the_test_questions_right() -> None:
    router = await build_router(RouterSettings())
    assert router.name == "embedding"
    test = [q for q in load_questions() if q["split"] == "test"]
    mistakes = []
    for question in test:
        decision = await router.route(question["question"], "auto")
        if decision.decision != question["label"]:
            mistakes.append(f"{question['question']} ({question['label']}): {decision.reason}")
    assert len(mistakes) <= 0.05 * len(test), "\n".join(mistakes)


@pytest.mark.parametrize("cue", EN_CUES)
def test_every_english_cue_is_found_whatever_its_case_and_ending(cue: str) -> None:
    stem = cue.removesuffix("*")
    word = stem + ("ed" if cue.endswith("*") else "")
    assert find_cue(f"Tell me, {word.upper()} here?") is not None


def test_the_first_cue_of_the_list_wins_not_the_first_in_the_question() -> None:
    assert find_cue("Should I pay it, and why?") == "why"
    assert find_cue("What is in this image?") is None
