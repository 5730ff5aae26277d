"""Scoring one answer against a case's accepted answers. Pure.

An answer is right when it contains any accepted answer: a number (an accepted answer that is one number, "54.06",
"¥8", "3") matches a number in the answer of equal value (54.06 = "54.060" = "¥54.06"), read the way the arbiter
reads them (`orchestrator.arbitration.claim_values`); any other accepted answer matches where it appears in the
answer compacted (`orchestrator.arbitration.evidence.compact`: NFKC, case-folded, without whitespace or
punctuation), so "Blue Lotus Cafe" is found in "It is from BLUE LOTUS CAFE!" (not in "Café": accents count).
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from orchestrator.arbitration.claim_values import find_numbers
from orchestrator.arbitration.evidence import compact


def answer_matches(answer: str, accepted: Sequence[str]) -> bool:
    """Whether `answer` gives any of the `accepted` answers (module docstring)."""
    text = compact(answer)
    numbers = {mention.value for mention in find_numbers(answer)}
    for expected in accepted:
        value = _single_number(expected)
        if value is not None:
            if value in numbers:
                return True
        elif (wanted := compact(expected)) and wanted in text:
            return True
    return False


def _single_number(text: str) -> Decimal | None:
    """The value of `text` when it is one number and nothing more but a currency or unit sign ("¥8", "54.06")."""
    mentions = find_numbers(text)
    if len(mentions) != 1:
        return None
    mention = mentions[0]
    rest = text[: mention.start] + text[mention.end :]
    return mention.value if not compact(rest) or compact(rest) == compact(mention.unit) else None
