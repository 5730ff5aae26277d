"""Pure parts of the ocr backend: relevance scoring, language detection, ImageNet tags."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from vision_stage.relevance import Vector, detect_languages, lexical_tokens, rank_lines, relevance_scores
from vision_stage.tags import load_labels, top_tags
from vision_stage.types import TextLine


def line(text: str, order: int) -> TextLine:
    return TextLine(text, ((0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)), 0.99, order)


# -- relevance -------------------------------------------------------------------------------------------------------


def vectors(*rows: Sequence[float]) -> Vector:
    return np.array(rows, dtype=np.float32)


def vector(*values: float) -> Vector:
    return np.array(values, dtype=np.float32)


def test_cosine_similarity_decides_when_no_words_are_shared() -> None:
    scores = relevance_scores("zzz", vector(1, 0), ["near", "far"], vectors([0.9, 0.1], [0.1, 0.9]))

    assert scores[0] > scores[1]
    assert all(-1 <= score <= 1 for score in scores)


def test_shared_words_break_a_near_tie_in_cosine() -> None:
    question, question_vector = "What is the total?", vector(1, 0)
    lines = ["Subtotal 51.00", "TOTAL 54.06"]
    line_vectors = vectors([0.99, 0.14], [0.96, 0.28])  # the embedding slightly prefers Subtotal

    scores = relevance_scores(question, question_vector, lines, line_vectors)

    assert scores[1] > scores[0]


def test_a_question_asking_for_a_number_prefers_lines_with_digits() -> None:
    lines = ["禁止吸烟", "每小时5元"]
    same = vectors([1, 0], [1, 0])

    how_much = relevance_scores("停车多少钱？", vector(1, 0), lines, same)
    how_is_it = relevance_scores("停车怎么样？", vector(1, 0), lines, same)

    assert how_much[1] > how_much[0]
    assert how_is_it[0] == how_is_it[1]


def test_relevance_needs_one_vector_per_line() -> None:
    with pytest.raises(ValueError, match="2 lines but 1 line vectors"):
        relevance_scores("q", vector(1, 0), ["a", "b"], vectors([1, 0]))


def test_lexical_tokens_are_words_numbers_and_cjk_characters() -> None:
    assert lexical_tokens("What is the total?") == {"total"}
    assert lexical_tokens("TOTAL 54.06") == {"total", "54.06"}
    assert lexical_tokens("停车多少钱？") == set("停车多少钱")


def test_rank_lines_sets_relevance_and_puts_the_best_first() -> None:
    ranked = rank_lines([line("a", 0), line("b", 1), line("c", 2)], [0.2, 0.9, 0.2])

    assert [(item.text, item.relevance) for item in ranked] == [("b", 0.9), ("a", 0.2), ("c", 0.2)]


@pytest.mark.parametrize(
    ("texts", "languages"),
    [
        (["TOTAL 54.06", "Latte", "谢谢惠顾"], ("en", "zh")),
        (["停车场收费标准", "小型车每小时5元"], ("zh",)),
        (["12:41", "54.06"], ()),
    ],
)
def test_detect_languages(texts: list[str], languages: tuple[str, ...]) -> None:
    assert detect_languages(texts) == languages


# -- tags ------------------------------------------------------------------------------------------------------------


def test_imagenet_labels_are_the_1000_classes_in_index_order() -> None:
    labels = load_labels()

    assert len(labels) == 1000
    assert (labels[0], labels[922], labels[999]) == ("tench", "menu", "toilet tissue")


def test_top_tags_keep_the_most_probable_above_the_floor() -> None:
    probabilities = np.array([0.02, 0.5, 0.3, 0.1, 0.08], dtype=np.float32)

    tags = top_tags(probabilities, ["a", "b", "c", "d", "e"], top_k=3, min_score=0.09)

    assert [(tag.label, tag.score) for tag in tags] == [("b", 0.5), ("c", 0.3), ("d", 0.1)]
    assert top_tags(probabilities, ["a", "b", "c", "d", "e"], top_k=3, min_score=0.6) == ()
