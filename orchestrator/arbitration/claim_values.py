"""Numbers, dates and times in text, read the same way from a reasoning answer (`orchestrator.arbitration.claims`) and
from the vision evidence (`orchestrator.arbitration.verification`). Pure.

- Numbers: "54.060" and "¥54.06" are 54.06; "1,234.50" is 1234.5; "54,06" (a comma followed by exactly two digits)
  is a decimal comma, 54.06; the unit keeps a currency or "%".
- Dates: ISO readings; without a year "--03-14"; a numeric date that reads both ways (03/04/2026) is
  "2026-03-04|2026-04-03". Times: "HH:MM", 24-hour.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation


@dataclass(frozen=True)
class NumberMention:
    """A number found in a text, with its unit ("¥", "元", "%", or "") and where it lies."""

    value: Decimal
    unit: str
    start: int
    end: int


MONTHS = {m[:3].lower(): i for i, m in enumerate(str.split(
    "January February March April May June July August September October November December"), start=1)}  # fmt: skip

_MONTH = r"(?P<mon>jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?"

_DATE_PATTERNS = (
    re.compile(r"(?<!\d)(?P<y>\d{4})\s*[-/.年]\s*(?P<m>\d{1,2})\s*[-/.月]\s*(?P<d>\d{1,2})(?:\s*[日号])?(?:(?!\d)|(?=\d{1,2}:\d\d))"),
    re.compile(r"(?<!\d)(?P<a>\d{1,2})[/.-](?P<b>\d{1,2})[/.-](?P<y>\d{4})(?!\d)"),
    re.compile(r"(?<![\d年])(?P<m>\d{1,2})\s*月\s*(?P<d>\d{1,2})\s*[日号]"),
    re.compile(r"\b" + _MONTH + r"\s+(?P<d>\d{1,2})(?:st|nd|rd|th)?\b(?:,?\s*(?P<y>\d{4})\b)?", re.IGNORECASE),
    re.compile(r"\b(?P<d>\d{1,2})(?:st|nd|rd|th)?\s+(?:of\s+)?" + _MONTH + r"(?:,?\s*(?P<y>\d{4})\b)?", re.IGNORECASE),
)  # fmt: skip

_TIME = re.compile(
    r"(?P<half>上午|下午|晚上)?(?<!\d)(?P<h>[01]?\d|2[0-4])(?:[:：](?P<m>[0-5]\d)(?::[0-5]\d)?(?!\d)|点(?P<zm>[0-5]?\d)分)"
    r"(?:\s*(?P<ampm>[ap]\.?m\b\.?))?",
    re.IGNORECASE,
)

_NUMBER = re.compile(
    r"(?<![\d.,])(?P<pre>[¥￥$€£]|RMB|CNY|USD|EUR)?\s?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d+|\d+,\d{2}(?![\d,])|\d+)(?![\d])"
    r"(?P<unit>\s?(?:%|％|元|块钱|块|(?:yuan|dollars?|euros?|USD|CNY|RMB|EUR)\b))?",
    re.IGNORECASE,
)


def mask(text: str, spans: list[tuple[int, int]]) -> str:
    """`text` with the characters of `spans` replaced by a placeholder, so positions stay where they were."""
    chars = list(text)
    for start, end in spans:
        chars[start:end] = "\u2063" * (end - start)
    return "".join(chars)


def parse_number(text: str) -> Decimal | None:
    """ "54.06", "54.060", "1,234.50", "54,06" (decimal comma) as a Decimal; None when it is not a number."""
    cleaned = text.strip()
    if re.fullmatch(r"\d+,\d{2}", cleaned):
        cleaned = cleaned.replace(",", ".")
    try:
        return Decimal(cleaned.replace(",", ""))
    except InvalidOperation:
        return None


def find_numbers(text: str) -> tuple[NumberMention, ...]:
    """The numbers in `text` outside its dates and times, with their currency or unit."""
    masked = mask(text, [span for span, _ in find_dates(text)] + [span for span, _ in find_times(text)])
    mentions = []
    for match in _NUMBER.finditer(masked):
        value = parse_number(match.group("num"))
        if value is not None:
            unit = (match.group("unit") or match.group("pre") or "").strip().replace("％", "%")
            mentions.append(NumberMention(value, unit, match.start(), match.end()))
    return tuple(mentions)


def find_dates(text: str) -> tuple[tuple[tuple[int, int], str], ...]:
    """((start, end), reading) for each date in `text`; readings as in the module docstring."""
    found: list[tuple[tuple[int, int], str]] = []
    for pattern in _DATE_PATTERNS:
        for match in pattern.finditer(text):
            span = match.span()
            if any(start < span[1] and span[0] < end for (start, end), _ in found):
                continue
            reading = _date_reading(match.groupdict())
            if reading is not None:
                found.append((span, reading))
    return tuple(sorted(found))


def _date_reading(groups: dict[str, str | None]) -> str | None:
    year = groups.get("y") or ""
    if groups.get("a") is not None:  # numeric day/month/year or month/day/year
        first, second = int(groups["a"] or 0), int(groups["b"] or 0)
        readings = {_iso(year, m, d) for m, d in ((second, first), (first, second))}
        valid = sorted(reading for reading in readings if reading is not None)
        return "|".join(valid) or None
    month_name = groups.get("mon")
    month = MONTHS.get(month_name[:3].lower(), 0) if month_name else int(groups.get("m") or 0)
    return _iso(year, month, int(groups.get("d") or 0))


def _iso(year: str, month: int, day: int) -> str | None:
    if not (1 <= month <= 12 and 1 <= day <= 31):
        return None
    return f"{year}-{month:02d}-{day:02d}" if year else f"--{month:02d}-{day:02d}"


def find_times(text: str) -> tuple[tuple[tuple[int, int], str], ...]:
    """((start, end), "HH:MM") for each time of day in `text`."""
    found = []
    for match in _TIME.finditer(text):
        hour = int(match.group("h"))
        minute = int(match.group("m") or match.group("zm") or 0)
        marker = (match.group("ampm") or "").lower()
        if (marker.startswith("p") or match.group("half") in ("下午", "晚上")) and hour < 12:
            hour += 12
        elif marker.startswith("a") and hour == 12:
            hour = 0
        found.append((match.span(), f"{hour:02d}:{minute:02d}"))
    return tuple(found)
