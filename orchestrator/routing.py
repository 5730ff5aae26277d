"""Deciding whether the vision stage answers alone or the question needs the reasoning stage.

`route` is a pure function: a question and the client's `mode` in, a `RouteDecision` with its reason out. This first
router uses keyword cues in Chinese and English; a question with no cue is one the vision stage can answer directly
("what is the total?", "这张小票一共多少钱？").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Decision = Literal["vision_only", "vision_then_reasoning"]
RequestedMode = Literal["auto", "vision", "reasoning"]

ZH_CUES: tuple[str, ...] = (
    "为什么",
    "为何",
    "怎么办",
    "怎么做",
    "应该",
    "是否合理",
    "合理吗",
    "建议",
    "后果",
    "能不能",
    "可以报销",
    "能报销",
    "是否合法",
    "合法吗",
    "意味着",
    "说明什么",
    "原因",
    "风险",
    "如何处理",
    "值得",
    "解释",
)

EN_CUES: tuple[str, ...] = (
    "why",
    "should",
    "explain",
    "is it",
    "is this",
    "is that",
    "are they",
    "what should",
    "what could",
    "what does it mean",
    "what does this mean",
    "means",
    "recommend",
    "advice",
    "advise",
    "reasonable",
    "legal",
    "allowed",
    "reimburs",
    "consequence",
    "risk",
    "worth",
    "how do i",
    "how should",
    "how can i",
    "diagnos",
    "could this",
    "would",
)

_EN_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (cue, re.compile(r"\b" + re.escape(cue), re.IGNORECASE)) for cue in EN_CUES
)


@dataclass(frozen=True)
class RouteDecision:
    """Where the question goes. `score` is the evidence for reasoning in [0, 1]; `reason` says what decided."""

    decision: Decision
    score: float
    reason: str
    forced: bool = False


def find_cue(question: str) -> str | None:
    """The first reasoning cue in `question`, Chinese or English, or None."""
    for cue in ZH_CUES:
        if cue in question:
            return cue
    for cue, pattern in _EN_PATTERNS:
        if pattern.search(question):
            return cue
    return None


def route(question: str, mode: RequestedMode) -> RouteDecision:
    cue = find_cue(question)
    score = 1.0 if cue is not None else 0.0
    if mode == "vision":
        return RouteDecision("vision_only", score, "mode forced by the client: vision", forced=True)
    if mode == "reasoning":
        return RouteDecision("vision_then_reasoning", score, "mode forced by the client: reasoning", forced=True)
    if cue is not None:
        return RouteDecision("vision_then_reasoning", score, f"keyword router: reasoning cue “{cue}” found")
    return RouteDecision("vision_only", score, "keyword router: no reasoning cue; the vision stage answers directly")
