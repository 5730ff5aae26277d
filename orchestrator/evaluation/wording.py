"""How the generated cases word their numbers and answers, in English and Chinese. Pure.

Money is drawn and answered with two decimals ("54.06"; the scorer compares numbers by value). A count's accepted
answers are its digits and its words bound to their unit ("3", "three circles", "三个"): a bare "三" would be found in
"三角形", a bare "eight" in "height".
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import TypeVar

from orchestrator.analysis.messages import Language

T = TypeVar("T")
Pair = tuple[str, str]
"""A name in English and in Chinese."""

CENT = Decimal("0.01")
EN_NUMBERS = (
    *("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
    *("eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"),
)
ZH_DIGITS = "零一二三四五六七八九"


def pick(language: Language, en: T, zh: T) -> T:
    """The English or the Chinese of a pair."""
    return en if language == "en" else zh


def both(pair: Pair, language: Language) -> tuple[str, ...]:
    """A name's accepted answers: the drawn language's form first, then the other's."""
    return pair if language == "en" else (pair[1], pair[0])


def money(value: Decimal) -> str:
    """`value` with two decimals, rounded half up: "54.06"."""
    return str(value.quantize(CENT, rounding=ROUND_HALF_UP))


def zh_number(value: int) -> str:
    """0–99 in Chinese numerals: 3 → 三, 12 → 十二, 42 → 四十二."""
    if not 0 <= value < 100:
        raise ValueError(f"{value} is outside 0–99")
    tens, ones = divmod(value, 10)
    if tens == 0:
        return ZH_DIGITS[ones]
    return ("" if tens == 1 else ZH_DIGITS[tens]) + "十" + (ZH_DIGITS[ones] if ones else "")


def count_answers(value: int, en_unit: tuple[str, str], zh_units: tuple[str, ...]) -> tuple[str, ...]:
    """The accepted answers for a count: the digits, the English words with the unit (`(singular, plural)`), the
    Chinese numerals with each unit (两 for 2 too)."""
    answers = [str(value)]
    if value < len(EN_NUMBERS):
        answers.append(f"{EN_NUMBERS[value]} {en_unit[0] if value == 1 else en_unit[1]}")
    if value < 100:
        numerals = [zh_number(value), *(["两"] if value == 2 else [])]
        answers.extend(numeral + unit for numeral in numerals for unit in zh_units)
    return tuple(answers)
