"""Targeted yes/no probes: questions the vision stage can settle for a claim the evidence left unverifiable. Pure.

`probe_question(claim, language)` is the question for one claim, in the question's language, or None when a probe
cannot settle it. Probes cover the claims a vision model can look for: an object or person present or absent
("Is there a person in the image?", 图中有人吗？), a count of visual things ("Are there exactly 2 people in the
image?"), and a number with a referent ("Does the image show the total as 54.06?", 图中的合计是54.06元吗？).
The question always asks whether the claim *as stated* holds, except for absence: "there is no signature" is
probed as "Is there a signature?" and a "no" supports it.

`parse_reply(text)` reads a yes or no from the vision stage's reply: its first word (yes/no, 是/否/有/没有/不是/对…,
after an "Answer:" or 答： prefix and an 图中 opener), or else a clear statement (exactly one of "yes" and "no"
as words in English); a reply with both is a hedge. Anything else is None, and the check stays unverifiable.

`probed_check(check, question, reply)` turns the check into `supported` or `contradicted`, citing an evidence item
of source "probe" whose `where` is the question and whose `text` is the reply.
"""

from __future__ import annotations

import re
from dataclasses import replace

from orchestrator.analysis.messages import Language
from orchestrator.arbitration.claims import OBJECTS, Claim
from orchestrator.arbitration.evidence import EvidenceItem, EvidenceSource
from orchestrator.arbitration.verification import Check, Verdict

PROBE_SOURCE: EvidenceSource = "probe"
"""Evidence from a probe: `where` is the question put to the vision stage, `text` its reply."""

_EN_SUFFIX = " Answer yes or no."
_ZH_SUFFIX = "请回答是或否。"
_ZH_NAMES = {"person": "人"}
_EN_PLURALS = {"person": "people"}

_PREFIX = re.compile(r"^\s*(?:answer|reply|回答|答案|答)\s*[:：]\s*", re.IGNORECASE)
_ZH_OPENER = re.compile(r"^(?:在?(?:这张)?(?:图片|图像|图|画面|照片)(?:中|里|上)?)[，,\s]*")
_EN_FIRST = re.compile(r"^\W*(yes|yeah|yep|correct|true|no|nope|incorrect|false)\b", re.IGNORECASE)
_EN_YES = frozenset({"yes", "yeah", "yep", "correct", "true"})
_ZH_NO = ("不是", "不对", "不正确", "没有", "没", "否", "不", "无", "错")
_ZH_YES = ("是", "对", "有", "正确", "确实", "存在")


def probe_question(claim: Claim, language: Language) -> str | None:
    """The yes/no question that settles `claim` (module docstring), or None when no probe can."""
    if claim.kind == "object" and claim.value in OBJECTS:
        return _presence_question(claim.value, language)
    if claim.kind == "count" and claim.referent in OBJECTS:
        if claim.value == "0":
            return _presence_question(claim.referent, language)
        return _count_question(claim.referent, claim.value, language)
    if claim.kind == "number" and claim.referent:
        if language == "zh":
            return f"图中的{claim.referent}是{claim.text}吗？{_ZH_SUFFIX}"
        return f"Does the image show the {claim.referent} as {claim.text}?{_EN_SUFFIX}"
    return None


def asserts_presence(claim: Claim) -> bool:
    """Whether a "yes" to the claim's probe supports it (false for absence: "no person", "0 people")."""
    return not claim.negated and not (claim.kind == "count" and claim.value == "0")


def _presence_question(concept: str, language: Language) -> str:
    if language == "zh":
        return f"图中有{_zh_name(concept)}吗？{_ZH_SUFFIX}"
    return f"Is there a {concept} in the image?{_EN_SUFFIX}"


def _count_question(concept: str, count: str, language: Language) -> str:
    if language == "zh":
        return f"图中恰好有{count}个{_zh_name(concept)}吗？{_ZH_SUFFIX}"
    if count == "1":
        return f"Is there exactly one {concept} in the image?{_EN_SUFFIX}"
    return f"Are there exactly {count} {_EN_PLURALS.get(concept, concept + 's')} in the image?{_EN_SUFFIX}"


def _zh_name(concept: str) -> str:
    return _ZH_NAMES.get(concept) or OBJECTS[concept][1][0]


def parse_reply(text: str) -> bool | None:
    """True for yes, False for no, None when the reply does not clearly say either (module docstring)."""
    reply = _ZH_OPENER.sub("", _PREFIX.sub("", text.strip()))
    words = {word.lower() for word in re.findall(r"[A-Za-z]+", reply)}
    if {"yes", "no"} <= words:
        return None  # "yes and no": a hedge, not an answer
    first = _EN_FIRST.match(reply)
    if first:
        return first.group(1).lower() in _EN_YES
    for prefix in _ZH_NO:
        if reply.startswith(prefix):
            return False
    for prefix in _ZH_YES:
        if reply.startswith(prefix):
            return True
    if ("yes" in words) != ("no" in words):
        return "yes" in words
    return None


def probed_check(check: Check, question: str, reply: str) -> Check:
    """`check` settled by the vision stage's `reply` to `question`, or unchanged when the reply is no yes or no."""
    said_yes = parse_reply(reply)
    if said_yes is None:
        return check
    evidence = EvidenceItem(PROBE_SOURCE, reply.strip(), question)
    holds = said_yes == asserts_presence(check.claim)
    verdict: Verdict = "supported" if holds else "contradicted"
    reason = f"asked “{question}”, the vision stage answered {'yes' if said_yes else 'no'}"
    return replace(check, verdict=verdict, reason=reason, evidence=evidence)
