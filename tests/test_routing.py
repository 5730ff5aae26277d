from __future__ import annotations

import pytest

from orchestrator.routing import route


@pytest.mark.parametrize(
    ("question", "cue"),
    [
        ("为什么这张发票不能报销？", "为什么"),
        ("这种情况应该怎么办？", "怎么办"),
        ("这个价格是否合理？", "是否合理"),
        ("你有什么建议？", "建议"),
        ("不处理会有什么后果？", "后果"),
        ("Why is the total higher than the subtotal?", "why"),
        ("Should I pay this bill now?", "should"),
        ("Explain this chart.", "explain"),
        ("Is it safe to eat this?", "is it"),
    ],
)
def test_reasoning_cues_route_to_reasoning_with_the_cue_named(question: str, cue: str) -> None:
    decision = route(question, "auto")
    assert decision.decision == "vision_then_reasoning"
    assert cue in decision.reason
    assert decision.score == 1.0
    assert not decision.forced


@pytest.mark.parametrize(
    "question",
    ["What is the total?", "这张小票一共多少钱？", "What text is on the sign?", "图中有几个人？", "Read the date."],
)
def test_perception_questions_stay_with_the_vision_stage(question: str) -> None:
    decision = route(question, "auto")
    assert decision.decision == "vision_only"
    assert decision.score == 0.0
    assert "no reasoning cue" in decision.reason


def test_english_cues_match_whole_words_only() -> None:
    assert route("What does the asterisk mark?", "auto").decision == "vision_only"  # "risk" inside a word
    assert route("What is written under Ellsworth?", "auto").decision == "vision_only"  # "worth" inside a word


def test_client_mode_overrides_the_router_and_says_so() -> None:
    forced_vision = route("Why is it so expensive?", "vision")
    assert forced_vision.decision == "vision_only"
    assert forced_vision.forced
    assert "forced by the client" in forced_vision.reason
    forced_reasoning = route("What is the total?", "reasoning")
    assert forced_reasoning.decision == "vision_then_reasoning"
    assert forced_reasoning.forced
