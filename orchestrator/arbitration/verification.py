"""Checking each claim of a reasoning answer against what the vision stage saw. Pure functions over frozen data.

`verify(claim, evidence)` gives one `Check` with a verdict (`supported`, `contradicted`, `unverifiable`), the evidence
it rests on and a short reason. The rules:

- **Evidence** is gathered by `orchestrator.arbitration.evidence` (rows, fields, objects, tags, sentences), its
  strings compared compacted.
- **Numbers** (`number`, and `count` of things that are not visual concepts, "3 items"): 54.06 = "54.060" = "¥54.06"
  = "54,06"; percentages only match percentages; a two-decimal amount also matches where OCR ran two amounts
  together ("Sandwich3x5.7517.25" shows 5.75). A *referent line* is a row, field or sentence that mentions every
  referent term found anywhere in the evidence (terms absent from the whole image are dropped: "final total" →
  "total"); synonyms count (total/合计/总计/应付/TOTAL…, `REFERENT_GROUPS`), and a term inside a longer known term does
  not ("total" is not in "Subtotal"). The number on a referent line → `supported`; referent lines that show other
  numbers → `contradicted`, citing the line; no referent line, or no referent: the number anywhere → `supported`
  only when the claim named no referent, else `unverifiable` (it may be computed, or tied to words the image lacks).
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
from vision_stage.relevance import Embedder

Verdict = Literal["supported", "contradicted", "unverifiable"]

QUOTE_SUPPORT = 0.85
QUOTE_CONFLICT = 0.5
QUOTE_COSINE = 0.9
TAG_MIN_SCORE = 0.4

REFERENT_GROUPS: dict[str, tuple[str, ...]] = {
    "total": ("total", "grandtotal", "amountdue", "balancedue", "amount", "paid", "spent", "charged", "合计", "总计",
              "总额", "总金额", "总价", "共计", "应付", "实付", "应收", "价税合计", "一共", "总共"),
    "subtotal": ("subtotal", "小计"),
    "tax": ("tax", "vat", "gst", "税", "税额", "税金"),
    "date": ("date", "dated", "日期"),
    "time": ("time", "时间"),
    "change": ("change", "找零"),
    "cash": ("cash", "tendered", "现金", "实收"),
    "discount": ("discount", "折扣", "优惠"),
    "tip": ("tip", "gratuity", "小费", "服务费"),
    "price": ("price", "unitprice", "单价", "价格", "售价", "收费"),
    "quantity": ("quantity", "qty", "数量"),
}  # fmt: skip
_TERM_GROUP = {term: group for group, terms in REFERENT_GROUPS.items() for term in terms}
_VOCABULARY = sorted(_TERM_GROUP, key=len, reverse=True)


@dataclass(frozen=True)
class Check:
    """The verdict on one claim, the evidence it rests on (None when nothing bore on it), and why."""

    claim: Claim
    verdict: Verdict
    reason: str
    evidence: EvidenceItem | None = None


def verify_all(claims: Sequence[Claim], evidence: Evidence, embedder: Embedder | None = None) -> tuple[Check, ...]:
    return tuple(verify(claim, evidence, embedder) for claim in claims)


def verify(claim: Claim, evidence: Evidence, embedder: Embedder | None = None) -> Check:
    """The verdict on `claim` (module docstring); `embedder` is only used for quotes, and only to support."""
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


def referent_items(referent: str, items: Sequence[EvidenceItem]) -> list[EvidenceItem]:
    """The items mentioning every term of `referent` that occurs anywhere in `items` (module docstring)."""
    texts = [(compact(item.text), item.text.lower()) for item in items]
    terms = [term for term in _referent_terms(referent) if any(_mentions(text, term) for text in texts)]
    if not terms:
        return []
    return [item for item, text in zip(items, texts, strict=True) if all(_mentions(text, t) for t in terms)]


def _referent_terms(referent: str) -> list[tuple[str, ...]]:
    """Each term as the strings that stand for it: a synonym group, a word and its singular, or Chinese bigrams."""
    terms: list[tuple[str, ...]] = []
    for word in re.findall(r"[a-z][a-z'-]+", referent.lower()):
        group = _TERM_GROUP.get(word)
        terms.append(REFERENT_GROUPS[group] if group else tuple({word, word.rstrip("s") or word}))
    chinese = "".join(re.findall(r"[\u3400-\u9fff]+", referent))
    named = [term for term in _VOCABULARY if not term.isascii() and term in chinese]
    terms += [REFERENT_GROUPS[group] for group in sorted({_TERM_GROUP[term] for term in named})]
    for term in named:
        chinese = chinese.replace(term, "")
    if len(chinese) >= 2:
        terms.append(("\0bigrams", *(chinese[i : i + 2] for i in range(len(chinese) - 1))))
    elif chinese and not named:
        terms.append((chinese,))
    return terms


def _mentions(text: tuple[str, str], term: tuple[str, ...]) -> bool:
    """Whether a text, as (compacted, lower-cased), mentions `term`."""
    if term[0] == "\0bigrams":
        bigrams = term[1:]
        return sum(bigram in text[0] for bigram in bigrams) >= max(1, len(bigrams) / 2)
    return any(_mentions_word(text, word) for word in term)


def _mentions_word(texts: tuple[str, str], word: str) -> bool:
    """`word` in the compacted text (OCR drops spaces), not inside a longer known term ("total" in "subtotal");
    a Latin word of four letters or fewer must stand alone in the lower-cased text ("tax", not "taxi")."""
    text, lowered = texts
    if len(word) <= 4 and word.isascii():
        return re.search(rf"(?<![a-z]){re.escape(word)}(?![a-z])", lowered) is not None
    for longer in _VOCABULARY:
        if len(longer) > len(word) and word in longer and _TERM_GROUP.get(word) != _TERM_GROUP[longer]:
            text = text.replace(longer, "\0")
    return word in text


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
