"""Checking each claim of a reasoning answer against what the vision stage saw. Pure functions over frozen data.

`verify(claim, evidence)` gives one `Check` with a verdict (`supported`, `contradicted`, `unverifiable`), the evidence
it rests on and a short reason. The rules:

- **Evidence** is gathered by `orchestrator.arbitration.evidence` (rows, fields, objects, tags, sentences), its
  strings compared compacted.
- **Numbers** (`number`, and `count` of things that are not visual concepts, "3 items"): 54.06 = "54.060" = "¥54.06"
  = "54,06"; percentages only match percentages; a two-decimal amount also matches where OCR ran two amounts
  together ("Sandwich3x5.7517.25" shows 5.75). A *referent line* is a row, field or sentence about what the claim
  is about (`orchestrator.arbitration.referents`: "total" finds TOTAL/合计/总计…, not "Subtotal"). The number on a
  referent line → `supported`; referent lines that show other numbers → `contradicted`, citing the line; no
  referent line, or no referent: the number anywhere → `supported` only when the claim named no referent, else
  `unverifiable` (it may be computed, or tied to words the image lacks).
- **Dates and times**: normalised readings are compared; a reading found anywhere → `supported`; the image shows
  other dates (times) and not this one → `contradicted`, citing a referent line's date when there is one; the image
  shows none → `unverifiable`.
- **Quotes**: the compacted quote inside a compacted row or field (or inside all rows joined) → `supported`; a row
  that matches it closely (similarity ≥ `QUOTE_SUPPORT`) → `supported`; one that matches it partly (≥
  `QUOTE_CONFLICT`) → `contradicted`, citing that row ("NO SMOKING" vs "NO PARKING"); otherwise, with an embedder,
  a row in another script whose cosine is ≥ `QUOTE_COSINE` (a translation) → `supported`. A quote the answer
  presents as the image's text ("the sign says “…”", 写着“…”: the claim's referent) that nothing read resembles →
  `contradicted`, when OCR read any text; any other quote → `unverifiable`. Embeddings never contradict.
- **Objects and visual counts**: named by detected objects, by tags scoring ≥ `TAG_MIN_SCORE`, or by the
  model's own sentences (read with `extract_claims`, negations included). The model saying so → `supported`, the
  model saying the opposite → `contradicted`. Absence means something only when the backend lists objects
  (`StructuredDescription.objects` is not empty): then an unlisted object contradicts "there is a …" and supports
  "there is no …", and counts are compared with the listed ones. The `ocr` backend lists no objects: it cannot see
  people, so absence there is `unverifiable`, never `contradicted`.
- **The witness** (`Evidence.witness`: rows of a second reader of the image's text, independent of the vision stage,
  `orchestrator.arbitration.witness`) can only overrule a `supported` number, date, time or quote, and only where
  it reads the very thing otherwise; the check is then `contradicted`, its `evidence` the vision stage's reading and
  its `witness` the witness's row, its reason saying the witness read otherwise. Only witness rows read with a score
  ≥ `WITNESS_MIN_SCORE` count, and a number, date or time read half (a letter or digit glued to it: "8O.OO",
  "2026-03-1A") is no reading. A number: the witness's referent line for the claim's referent shows no claimed
  value and another one written at least as precisely as the vision stage's (no fewer decimals: "54" of "54.O6"
  is not 54.06's rival). A date or time: the witness shows none equal to the claim, and another one on a referent
  line, or as the only one both readers found. A quote of at least `WITNESS_QUOTE_MIN` characters that the vision
  stage read whole: the witness reads it nowhere, even up to OCR look-alikes (0/o, 1/l/i, 5/s, 8/b), and one of its
  rows matches it partly (similarity in [`WITNESS_QUOTE_CONFLICT`, `QUOTE_SUPPORT`)): "Blue Lotus Cafe" where the
  vision stage read "Blue Bottle Cafe". Otherwise (the witness agrees, has no such row, read no text, or the vision
  stage's verdict was not `supported`) the verdict is the vision stage's alone: the witness never supports, and
  never turns `unverifiable` into anything.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from difflib import SequenceMatcher
from typing import Literal

from orchestrator.analysis.messages import detect_language
from orchestrator.arbitration.claim_values import find_dates, find_numbers, find_times, parse_number
from orchestrator.arbitration.claims import OBJECTS, Claim, extract_claims
from orchestrator.arbitration.evidence import Evidence, EvidenceItem, compact
from orchestrator.arbitration.referents import referent_items
from vision_stage.relevance import Embedder

Verdict = Literal["supported", "contradicted", "unverifiable"]

QUOTE_SUPPORT = 0.85
QUOTE_CONFLICT = 0.5
QUOTE_COSINE = 0.9
TAG_MIN_SCORE = 0.4
WITNESS_MIN_SCORE = 0.8
WITNESS_QUOTE_CONFLICT = 0.6
WITNESS_QUOTE_MIN = 4
_OCR_CONFUSABLES = str.maketrans("01i58", "ollsb")
_GLUED_AFTER = re.compile(r"[.,]?[A-Za-z0-9]")
_GLUED_BEFORE = re.compile(r"[0-9O][.,]?$")


@dataclass(frozen=True)
class Check:
    """The verdict on one claim, the evidence it rests on (None when nothing bore on it), and why."""

    claim: Claim
    verdict: Verdict
    reason: str
    evidence: EvidenceItem | None = None
    witness: EvidenceItem | None = None
    """The witness's reading, when it contradicted the vision stage's (`evidence`): a row of source `witness`."""


def verify_all(claims: Sequence[Claim], evidence: Evidence, embedder: Embedder | None = None) -> tuple[Check, ...]:
    return tuple(verify(claim, evidence, embedder) for claim in claims)


def verify(claim: Claim, evidence: Evidence, embedder: Embedder | None = None) -> Check:
    """The verdict on `claim` (module docstring); `embedder` is only used for quotes, and only to support. With a
    witness's reading in `evidence`, a claim the vision stage's evidence supports is cross-examined against it."""
    check = _verify_seen(claim, evidence, embedder)
    return _cross_examine(check, evidence) if evidence.witness else check


def _verify_seen(claim: Claim, evidence: Evidence, embedder: Embedder | None) -> Check:
    """The verdict against the vision stage's evidence alone."""
    if claim.kind == "quote":
        return _verify_quote(claim, evidence, embedder)
    if claim.kind in ("date", "time"):
        return _verify_moment(claim, evidence)
    if claim.kind == "object" or (claim.kind == "count" and claim.referent in OBJECTS):
        return _verify_visual(claim, evidence)
    return _verify_number(claim, evidence)


# -- numbers --


def _comparable(claim: Claim, item: EvidenceItem) -> list[Decimal]:
    wants_percent = claim.unit == "%"
    return [mention.value for mention in find_numbers(item.text) if (mention.unit == "%") == wants_percent]


def _verify_number(claim: Claim, evidence: Evidence) -> Check:
    value = parse_number(claim.value)
    if value is None:
        return Check(claim, "unverifiable", f"“{claim.value}” is not a number")
    about = f" ({claim.referent})" if claim.referent else ""
    referent_lines = referent_items(claim.referent, evidence.items)
    for item in referent_lines:
        if _shows(claim, value, item):
            return Check(claim, "supported", f"{claim.value}{about} is on {item.where}: “{item.text}”", item)
    shown = [item for item in referent_lines if _comparable(claim, item)]
    if shown:
        item = shown[0]
        numbers = ", ".join(_plain(number) for number in _comparable(claim, item))
        reason = f"the image shows {numbers} for {claim.referent} ({item.where}: “{item.text}”), not {claim.value}"
        return Check(claim, "contradicted", reason, item)
    anywhere = next((item for item in evidence.items if value in _comparable(claim, item)), None)
    if anywhere is not None and not claim.referent:
        return Check(claim, "supported", f"{claim.value} is on {anywhere.where}: “{anywhere.text}”", anywhere)
    if anywhere is not None:
        reason = f"{claim.value} is on {anywhere.where}, but no line of the image mentions {claim.referent}"
        return Check(claim, "unverifiable", reason, anywhere)
    return Check(claim, "unverifiable", f"neither {claim.value}{about} nor a line about it is in the image")


def _shows(claim: Claim, value: Decimal, item: EvidenceItem) -> bool:
    """The number on the item; an amount with two decimals also where OCR ran two amounts together ("5.7517.25")."""
    if value in _comparable(claim, item):
        return True
    money = f"{value:.2f}"
    return claim.unit != "%" and re.search(rf"(?<![\d.]){re.escape(money)}(?=\d+\.\d\d)", item.text) is not None


def _plain(number: Decimal) -> str:
    return format(number.normalize(), "f")


# -- dates and times --


def _verify_moment(claim: Claim, evidence: Evidence) -> Check:
    finder = find_dates if claim.kind == "date" else find_times
    shown = [(item, reading) for item in evidence.items for _, reading in finder(item.text)]
    for item, reading in shown:
        if _same_moment(claim.value, reading):
            return Check(claim, "supported", f"{claim.text} is on {item.where}: “{item.text}”", item)
    if not shown:
        return Check(claim, "unverifiable", f"the image shows no {claim.kind}")
    on_referent = [pair for pair in shown if pair[0] in referent_items(claim.referent, evidence.items)]
    item, reading = (on_referent or shown)[0]
    reason = f"the image shows the {claim.kind} {reading.split('|')[0]} ({item.where}: “{item.text}”), not {claim.text}"
    return Check(claim, "contradicted", reason, item)


def _same_moment(claimed: str, shown: str) -> bool:
    for left in claimed.split("|"):
        for right in shown.split("|"):
            if left == right or ((left.startswith("--") or right.startswith("--")) and left[-5:] == right[-5:]):
                return True
    return False


# -- quotes --


def _verify_quote(claim: Claim, evidence: Evidence, embedder: Embedder | None) -> Check:
    quote = compact(claim.value)
    items = [item for item in evidence.items if item.source in ("text", "field")] or list(evidence.items)
    if len(quote) < 2 or not items:
        return Check(claim, "unverifiable", "no text in the image to compare the quote with")
    for item in items:
        if quote in compact(item.text):
            return Check(claim, "supported", f"the image reads “{item.text}” ({item.where})", item)
    if quote in compact(" ".join(item.text for item in items if item.source == "text")):
        return Check(claim, "supported", "the image reads it across lines", items[0])
    similarity, best = max(((_similarity(quote, compact(item.text)), item) for item in items), key=lambda p: p[0])
    if similarity >= QUOTE_SUPPORT:
        return Check(claim, "supported", f"the image reads “{best.text}” ({best.where}), up to OCR noise", best)
    if similarity >= QUOTE_CONFLICT:
        return Check(claim, "contradicted", f"the image reads “{best.text}” ({best.where}), not {claim.text}", best)
    by_meaning = _quote_by_meaning(claim, items, embedder)
    if by_meaning.verdict == "supported" or not claim.referent or not any(i.source == "text" for i in items):
        return by_meaning
    reason = f"the answer says the image reads {claim.text}, but nothing in it does; nearest: “{best.text}”"
    return Check(claim, "contradicted", reason, best)


def _similarity(quote: str, text: str) -> float:
    """How well `quote` matches the best-matching stretch of `text` of about its length (0..1)."""
    if len(text) <= len(quote) + 2:
        return SequenceMatcher(None, quote, text, autojunk=False).ratio()
    width = len(quote)
    return max(
        SequenceMatcher(None, quote, text[start : start + width], autojunk=False).ratio()
        for start in range(len(text) - width + 1)
    )


def _quote_by_meaning(claim: Claim, items: Sequence[EvidenceItem], embedder: Embedder | None) -> Check:
    if embedder is None:
        return Check(claim, "unverifiable", f"no text like {claim.text} in the image")
    vectors = embedder.passage([item.text for item in items])
    cosines = vectors @ embedder.query(claim.value)
    index = int(cosines.argmax())
    best = items[index]
    translated = detect_language(best.text) != detect_language(claim.value)
    if translated and float(cosines[index]) >= QUOTE_COSINE:
        return Check(claim, "supported", f"the image reads “{best.text}” ({best.where}), in another language", best)
    return Check(claim, "unverifiable", f"no text like {claim.text} in the image; nearest: “{best.text}”", best)


# -- objects and people --


def _verify_visual(claim: Claim, evidence: Evidence) -> Check:
    concept = claim.value if claim.kind == "object" else claim.referent
    said = _model_mentions(concept, evidence)
    if claim.kind == "count":
        return _verify_visual_count(claim, concept, evidence, said)
    positive = [item for item, negated in said if not negated]
    negative = [item for item, negated in said if negated]
    seen, unseen = (negative, positive) if claim.negated else (positive, negative)
    if seen:
        return Check(claim, "supported", f"the vision stage says so ({seen[0].where}: “{seen[0].text}”)", seen[0])
    if unseen:
        item = unseen[0]
        return Check(claim, "contradicted", f"the vision stage says otherwise ({item.where}: “{item.text}”)", item)
    if evidence.lists_objects:
        listed = ", ".join(evidence.objects)
        verdict: Verdict = "supported" if claim.negated else "contradicted"
        return Check(claim, verdict, f"the vision stage lists {listed} and no {concept}")
    reason = f"the {evidence.backend} backend lists no objects, so it cannot tell whether there is a {concept}"
    return Check(claim, "unverifiable", reason)


def _model_mentions(concept: str, evidence: Evidence) -> list[tuple[EvidenceItem, bool]]:
    """(item, negated) for each object, confident tag or model sentence naming `concept`."""
    words = _words(concept)
    found = [(EvidenceItem("object", label, f"object {i + 1}"), False)
             for i, label in enumerate(evidence.objects) if _names(label, words)]  # fmt: skip
    found += [(tag, False) for tag in evidence.tags if (tag.score or 0) >= TAG_MIN_SCORE and _names(tag.text, words)]
    for item in evidence.items:
        if item.source in ("caption", "answer", "description"):
            for said in extract_claims(item.text, "en"):
                if said.kind == "object" and said.value == concept:
                    found.append((item, said.negated))
                elif said.kind == "count" and said.referent == concept:
                    found.append((item, said.value == "0"))
    return found


def _words(concept: str) -> tuple[str, ...]:
    return (concept, *OBJECTS[concept][0], *OBJECTS[concept][1])


def _names(label: str, words: tuple[str, ...]) -> bool:
    """Whether an object label or tag names one of `words` (whole Latin words; Chinese words anywhere)."""
    lowered = label.lower()
    return any(word in lowered if not word.isascii() else re.search(rf"\b{re.escape(word)}\b", lowered) is not None
               for word in words)  # fmt: skip


def _verify_visual_count(
    claim: Claim, concept: str, evidence: Evidence, said: list[tuple[EvidenceItem, bool]]
) -> Check:
    counted = [c for item in evidence.items if item.source != "text" for c in extract_claims(item.text, "en")
               if c.kind == "count" and c.referent == concept]  # fmt: skip
    if evidence.lists_objects:
        listed = sum(1 for label in evidence.objects if _names(label, _words(concept)))
        verdict: Verdict = "supported" if str(listed) == claim.value else "contradicted"
        return Check(claim, verdict, f"the vision stage lists {listed} {concept}(s), the answer says {claim.value}")
    if counted:
        source = next(item for item in evidence.items if counted[0].text in item.text)
        verdict = "supported" if counted[0].value == claim.value else "contradicted"
        return Check(claim, verdict, f"the vision stage says “{source.text}” ({source.where})", source)
    if any(negated for _, negated in said):
        item = next(item for item, negated in said if negated)
        return Check(claim, "contradicted", f"the vision stage says there is none ({item.where}: “{item.text}”)", item)
    reason = f"the {evidence.backend} backend lists no objects, so it cannot count {concept}s"
    return Check(claim, "unverifiable", reason)


# -- the witness --


def _cross_examine(check: Check, evidence: Evidence) -> Check:
    """`check`, contradicted when the witness reads otherwise what the vision stage's evidence for it shows (module
    docstring); unchanged when the witness agrees, or has nothing it can read on it."""
    seen = check.evidence
    rows = [row for row in evidence.witness if row.score is None or row.score >= WITNESS_MIN_SCORE]
    if check.verdict != "supported" or seen is None or not rows:
        return check
    claim = check.claim
    if claim.kind == "number":
        otherwise = _witness_number(claim, seen, rows)
    elif claim.kind in ("date", "time"):
        otherwise = _witness_moment(claim, seen, rows, evidence)
    elif claim.kind == "quote":
        otherwise = _witness_quote(claim, seen, rows)
    else:
        return check
    if otherwise is None:
        return check
    row, read = otherwise
    about = f" for {claim.referent}" if claim.kind == "number" and claim.referent else ""
    reason = (f"the vision stage read {claim.text}{about} ({seen.where}: “{seen.text}”), but the OCR witness read "
              f"otherwise{f': {read}' if read else ''} ({row.where}: “{row.text}”)")  # fmt: skip
    return Check(claim, "contradicted", reason, seen, row)


def _witness_number(claim: Claim, seen: EvidenceItem, rows: list[EvidenceItem]) -> tuple[EvidenceItem, str] | None:
    """The witness's referent line showing another number, written at least as precisely as the vision stage's, and
    the numbers it shows as read."""
    value = parse_number(claim.value)
    if value is None or not claim.referent:
        return None
    places = max((_places(number) for number in _comparable(claim, seen) if number == value), default=2)
    lines = [item for item in referent_items(claim.referent, [seen, *rows]) if item.source == "witness"]
    if any(_shows(claim, value, line) for line in lines):
        return None
    wants_percent = claim.unit == "%"
    for line in lines:
        others = [mention.value for mention in find_numbers(line.text) if (mention.unit == "%") == wants_percent
                  and _places(mention.value) >= places and _apart(line.text, (mention.start, mention.end))]  # fmt: skip
        if others:
            return line, ", ".join(format(number, "f") for number in others)
    return None


def _places(number: Decimal) -> int:
    """Digits written after the decimal point ("80.00" → 2; "54" → 0)."""
    exponent = number.as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


def _witness_moment(
    claim: Claim, seen: EvidenceItem, rows: list[EvidenceItem], evidence: Evidence
) -> tuple[EvidenceItem, str] | None:
    """The witness's date (time) row showing another one: a referent line, or the only one both readers found."""
    finder = find_dates if claim.kind == "date" else find_times
    shown = [(row, reading) for row in rows for span, reading in finder(row.text) if _apart(row.text, span)]
    if not shown or any(_same_moment(claim.value, reading) for _, reading in shown):
        return None
    lines = referent_items(claim.referent, [seen, *rows]) if claim.referent else []
    on_referent = [(row, reading) for row, reading in shown if row in lines]
    seen_readings = {reading for item in evidence.items for _, reading in finder(item.text)}
    only = shown if len(seen_readings) == 1 and len({reading for _, reading in shown}) == 1 else []
    found = on_referent or only
    return (found[0][0], found[0][1].split("|")[0]) if found else None


def _apart(text: str, span: tuple[int, int]) -> bool:
    """A number, date or time read whole: no letter or digit glued after it, nor a digit (or an O) before it, as in
    the half-read "8O.OO", "54.O6" or "2026-03-1A" (a label before it is fine: OCR drops spaces, "TOTAL80.00")."""
    start, end = span
    return _GLUED_AFTER.match(text, end) is None and _GLUED_BEFORE.search(text[max(0, start - 2) : start]) is None


def _witness_quote(claim: Claim, seen: EvidenceItem, rows: list[EvidenceItem]) -> tuple[EvidenceItem, str] | None:
    """The witness's row reading the quoted text partly, where the vision stage read it whole (the row says it all)."""
    quote = compact(claim.value)
    read = compact(seen.text)
    if len(quote) < WITNESS_QUOTE_MIN or not (quote in read or _similarity(quote, read) >= QUOTE_SUPPORT):
        return None
    folded = quote.translate(_OCR_CONFUSABLES)
    texts = [compact(row.text).translate(_OCR_CONFUSABLES) for row in rows]
    if any(folded in text for text in texts) or folded in "".join(texts):
        return None
    similarity, index = max((_similarity(folded, text), index) for index, text in enumerate(texts))
    if similarity >= QUOTE_SUPPORT or similarity < WITNESS_QUOTE_CONFLICT:
        return None
    return rows[index], ""
