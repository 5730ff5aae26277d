"""Which lines of the evidence are about what a claim is about: its *referent* ("total", "合计", "date"). Pure.

`referent_items(referent, items)` gives the items mentioning every referent term found anywhere in `items` (terms
absent from all of them are dropped: "final total" → "total"). Synonyms count (total/合计/总计/应付/TOTAL…,
`REFERENT_GROUPS`); a term inside a longer known term does not ("total" is not in "Subtotal"); a Latin word of four
letters or fewer must stand alone ("tax", not "taxi"); Chinese words outside the groups match by their bigrams.
Strings are compared compacted (`orchestrator.arbitration.evidence.compact`). `orchestrator.arbitration.verification`
reads numbers and dates from these lines, the vision stage's and the witness's alike.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from orchestrator.arbitration.evidence import EvidenceItem, compact

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
