"""The concrete claims a reasoning answer makes about the image, read from its text (Chinese and English). Pure.

`extract_claims(answer, language)` returns one `Claim` per checkable statement, in the order they appear:

- `number`: "the total is 54.06", "总计54.06元", "¥15" → value "54.06", referent "total" / "总计", unit "元".
- `date`: 2026-03-14, 2026年3月14日, March 14, 2026, 14/03/2026 → "2026-03-14"; referent: the words before it.
- `time`: 12:41, 12点41分, 3:05 pm → "12:41" (24-hour); referent: the words before it.
- `quote`: “…”, "…", 「…」, 『…』, ‘…’ → the quoted text; referent: the word just before it that presents it as
  the image's text ("says", "reads", "by", "sign", 写着, 显示, 标牌…), or "" when nothing does.
- `object`: "a person walking", "there is no signature", 图中有一辆车, 图中没有人 → the concept ("person", "car"),
  `negated` for absence: the yes/no assertions about the image.
- `count`: "two people", "3 items", 两个人, 3件商品 → value "2", referent the counted thing ("person", "item", "商品").

- `referent` is what a number is about: the content words between the previous number (or the start of the clause)
  and the number, at most four, with function words dropped ("the total is" → "total"); when none precede it, the
  words right after it ("54.06 in total" → "total"). A Chinese referent is the text before the number in the clause,
  without a trailing 是/为/共/约 and anything up to the last 的 ("这张小票的总金额是" → "总金额").
- Numbers: "54.060" and "¥54.06" are 54.06; "1,234.50" is 1234.5; "54,06" (a comma followed by exactly two digits)
  is a decimal comma, 54.06. `unit` keeps a currency or "%": percentages only ever match percentages.
- Dates without a year are "--03-14"; a numeric date that reads both ways (03/04/2026) is "2026-03-04|2026-04-03".
- `object` claims come from a lexicon of visual concepts (`OBJECTS`) in a presence context: an indefinite article,
  a quantifier, "there is/are", 有/看到; `negated` is set for "no …", "not any …", "without …", 没有/无/未见.
  Clauses that give advice or hypotheses ("needs a signature", "if a person…", 需要/如果/建议) make no claims.
- Text inside quotes makes only the `quote` claim; integers read as counts make no `number` claim.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from orchestrator.analysis.messages import Language
from orchestrator.arbitration.claim_values import find_dates, find_numbers, find_times, mask

ClaimKind = Literal["number", "date", "time", "quote", "object", "count"]


@dataclass(frozen=True)
class Claim:
    """One checkable statement of an answer; `span` is where its words lie in the answer (start, end)."""

    kind: ClaimKind
    text: str
    value: str
    referent: str = ""
    unit: str = ""
    negated: bool = False
    span: tuple[int, int] = (0, 0)


_OBJECT_TABLE = """
person: person people persons man men woman women child children kid kids boy boys girl girls pedestrian pedestrians
    someone somebody anyone anybody human humans | 行人 男人 女人 孩子 儿童 小孩 人
car: car cars vehicle vehicles truck trucks bus buses taxi | 汽车 车辆 车
bicycle: bicycle bicycles bike bikes | 自行车 单车
dog: dog dogs puppy | 狗 小狗
cat: cat cats kitten | 猫 小猫
bird: bird birds | 鸟
tree: tree trees | 树 树木
building: building buildings house houses | 建筑 房子 楼
signature: signature signatures autograph | 签名 签字
stamp: stamp stamps seal seals | 印章 公章 盖章 章
logo: logo logos | 标志 商标
table: table tables desk desks | 桌子 桌
chair: chair chairs | 椅子
bottle: bottle bottles | 瓶子 瓶
cup: cup cups mug mugs | 杯子
phone: phone phones smartphone | 手机 电话
computer: computer computers laptop laptops | 电脑 笔记本电脑
flower: flower flowers | 花
qr code: qr_code qr_codes barcode barcodes | 二维码 条形码
photo: photo photograph portrait | 照片 相片
"""


def _parse_objects(table: str) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    objects = {}
    for entry in re.split(r"\n(?=\S)", table.strip()):
        concept, _, words = entry.partition(":")
        english, _, chinese = words.partition("|")
        objects[concept] = (tuple(w.replace("_", " ") for w in english.split()), tuple(chinese.split()))
    return objects


OBJECTS = _parse_objects(_OBJECT_TABLE)
"""The visual concepts object claims are about: concept → (English words, singular and plural; Chinese words)."""
_EN_OBJECT = {word: concept for concept, (words, _) in OBJECTS.items() for word in words}
_ZH_OBJECT = {word: concept for concept, (_, words) in OBJECTS.items() for word in words}

EN_NUMBERS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
    "eleven": 11, "twelve": 12, "a couple of": 2, "a pair of": 2,
}  # fmt: skip
ZH_DIGITS = {"一": 1, "两": 2, "二": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9, "十": 10}

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_QUOTE = re.compile(r"“([^”]{1,200})”|\"([^\"\n]{1,200})\"|「([^」]{1,200})」|『([^』]{1,200})』|‘([^’]{1,200})’")
_CLAUSE_BREAK = re.compile(r"[。！？!?;；\n，、()（）]|,(?!\d{3})|\.(?!\d)")
_SOFT_CUES = re.compile(
    r"\b(?:if|would|could|might|should|need|needs|needed|require|requires|required|must|ask|consult|get|obtain|"
    r"add|check whether|whether|may)\b|如果|需要|应该|建议|可以|是否|若",
    re.IGNORECASE,
)
REFERENT_STOPWORDS = frozenset(str.split(
    "a an the is are was were be been it its this that these those there here of for at on in to and or with by as "
    "from i we you they he she your my our their me comes come came reads read says said shows shown show showing "
    "listed lists printed written states stated stating displays displayed displaying which what who about around "
    "approximately roughly only just exactly each per receipt bill invoice image picture photo document sign line "
    "item value figure number bought buy spent cost costs priced x so also then than now"))  # fmt: skip
_SOFT_REFERENTS = frozenset({"price", "prices", "cost", "fee", "charge", "amount", "sum"})
_ZH_REFERENT_TRIM = re.compile(r"(?:是|为|共|约|大约|一共|总共|：|:|\s|写着|显示|标明|金额为)+$")
_COUNT_UNITS_EN = frozenset(str.split(
    "x times percent dollars dollar yuan euros euro minutes minute hours hour days day years year months month "
    "seconds second am pm kg g km ml cm mm am"))  # fmt: skip


def extract_claims(answer: str, language: Language) -> tuple[Claim, ...]:
    """Every checkable claim in `answer`, in order of appearance (see the module docstring).

    `language` is the answer's expected language; both languages' patterns run on every answer, since answers
    quote the image's text in whatever language it is written.
    """
    del language  # both grammars run on every answer; kept so callers state what they expect
    quotes = _quote_claims(answer)
    masked = mask(answer, [claim.span for claim in quotes])
    dates = _date_claims(masked)
    masked = mask(masked, [claim.span for claim in dates])
    times = _time_claims(masked)
    masked = mask(masked, [claim.span for claim in times])
    counts = _count_claims(masked)
    objects = _object_claims(masked, [claim.span for claim in counts])
    masked = mask(masked, [claim.span for claim in counts])
    numbers = _number_claims(masked, answer)
    found = quotes + dates + times + counts + objects + numbers
    return tuple(sorted(found, key=lambda claim: claim.span))


_READS_EN = re.compile(
    r"\b(?:says?|said|reads?|reading|written|writes|shows?|showing|displays?|printed|label(?:l)?ed|titled|named|"
    r"signed|by|name|sign|text|heading|header|line|words?)\b[^\w“”\"「」『』‘’]*$",
    re.IGNORECASE,
)
_READS_ZH = re.compile(
    r"(?:写着|写的是|写有|显示|标着|标有|印着|名为|内容|文字|标牌|牌子|上面|签名|姓名|名字)[是为：:]?\s*$"
)


def _quote_claims(answer: str) -> tuple[Claim, ...]:
    """Quotes; `referent` is the word that presents the quote as the image's text ("says", "写着"), if any."""
    claims = []
    for match in _QUOTE.finditer(answer):
        inner = next(group for group in match.groups() if group is not None).strip()
        before = answer[max(0, match.start() - 30) : match.start()]
        cue = _READS_EN.search(before) or _READS_ZH.search(before)
        if inner:
            claims.append(Claim("quote", match.group(0), inner, referent=_cue_word(cue), span=match.span()))
    return tuple(claims)


def _cue_word(cue: re.Match[str] | None) -> str:
    return re.sub(r"[^\w]+", "", cue.group(0)) if cue else ""


def _date_claims(text: str) -> tuple[Claim, ...]:
    return tuple(
        Claim("date", text[start:end], reading, referent=_referent(text, start, end), span=(start, end))
        for (start, end), reading in find_dates(text)
    )


def _time_claims(text: str) -> tuple[Claim, ...]:
    return tuple(
        Claim("time", text[start:end], reading, referent=_referent(text, start, end), span=(start, end))
        for (start, end), reading in find_times(text)
    )


def _number_claims(text: str, original: str) -> tuple[Claim, ...]:
    """Numbers found in `text` (the answer with quotes, dates, times and counts masked); referents from `original`."""
    claims = []
    for mention in find_numbers(text):
        value = format(mention.value.normalize(), "f")
        referent = _referent(original, mention.start, mention.end)
        raw = text[mention.start : mention.end].strip()
        claims.append(
            Claim("number", raw, value, referent=referent, unit=mention.unit, span=(mention.start, mention.end))
        )
    return tuple(claims)


def clause_bounds(text: str, start: int, end: int) -> tuple[int, int]:
    """The clause around text[start:end]: from the last clause break before it to the next one after it."""
    before = [match.end() for match in _CLAUSE_BREAK.finditer(text, 0, start)]
    after = _CLAUSE_BREAK.search(text, end)
    return (before[-1] if before else 0), (after.start() if after else len(text))


def _referent(text: str, start: int, end: int) -> str:
    """What the value at text[start:end] is about (module docstring): words before it, else words after it."""
    clause_start, clause_end = clause_bounds(text, start, end)
    before = text[clause_start:start]
    previous = list(re.finditer(r"\d", before))
    if previous:
        before = before[previous[-1].end() :]
    before = before.replace("\u2063", " ")
    if re.search(f"[{_CJK}]", before):
        return _zh_referent(before)
    words = _content_words(before)[-4:]
    if not words:
        after = re.split(r"\d", text[end:clause_end].replace("\u2063", " "), maxsplit=1)[0]
        words = _content_words(after)[:3]
    if len(words) > 1:
        words = [word for word in words if word not in _SOFT_REFERENTS] or words
    return " ".join(words)


def _content_words(text: str) -> list[str]:
    words = re.findall(r"[a-z][a-z'-]*", text.lower())
    return [word for word in words if word not in REFERENT_STOPWORDS and len(word) > 1]


def _zh_referent(before: str) -> str:
    latin = _content_words(before)
    chinese = "".join(re.findall(f"[{_CJK}]+", before))
    chinese = _ZH_REFERENT_TRIM.sub("", chinese)
    chinese = chinese.rsplit("的", 1)[-1]
    chinese = re.sub(r"^(?:图中|图片中|这张|小票|收据|发票|上面|上|显示)+", "", chinese)
    return " ".join([*latin[-2:], chinese[-8:]]).strip()


# -- counts and objects --

_EN_COUNT = re.compile(
    r"(?<![\d.,])\b(?P<n>\d+|" + "|".join(sorted(EN_NUMBERS, key=len, reverse=True)) + r")(?![.,]\d)\s+"
    r"(?P<w1>qr codes?|[a-z][a-z-]+)(?:\s+(?P<w2>qr codes?|[a-z][a-z-]+))?\b",
    re.IGNORECASE,
)
_ZH_MEASURE = "个位名辆只条张件杯份台本棵头匹把瓶盒袋双"
_ZH_COUNT = re.compile(rf"(?P<n>\d+|[一两二三四五六七八九十]{{1,3}})\s*[{_ZH_MEASURE}](?P<noun>[{_CJK}]{{1,4}})")
_ZH_NOUN_END = re.compile("[的了在和与及、，。是正着走站坐停]")


def _count_claims(text: str) -> tuple[Claim, ...]:
    claims = []
    for match in _EN_COUNT.finditer(text):
        count = int(match.group("n")) if match.group("n").isdigit() else EN_NUMBERS[match.group("n").lower()]
        group = _counted_word(match, count)
        noun = (match.group(group) or "").lower()
        if not noun or noun in _COUNT_UNITS_EN or noun in REFERENT_STOPWORDS or _soft(text, match.start()):
            continue
        concept = _EN_OBJECT.get(noun) or _singular(noun)
        span = (match.start(), match.end(group))
        if not (count == 1 and concept in OBJECTS):  # "one person" is a presence claim
            claims.append(Claim("count", text[span[0] : span[1]], str(count), referent=concept, span=span))
    for match in _ZH_COUNT.finditer(text):
        noun = _ZH_NOUN_END.split(match.group("noun"), maxsplit=1)[0]
        if not noun or _soft(text, match.start()):
            continue
        concept = next((c for word, c in _ZH_OBJECT.items() if noun.startswith(word)), noun)
        count = int(match.group("n")) if match.group("n").isdigit() else _zh_number(match.group("n"))
        span = (match.start(), match.start("noun") + len(noun))
        if not (count == 1 and concept in OBJECTS):  # 一辆车 is a presence claim
            claims.append(Claim("count", text[span[0] : span[1]], str(count), referent=concept, span=span))
    return tuple(claims)


def _counted_word(match: re.Match[str], count: int) -> str:
    """Which of the one or two words after a number is the counted noun: a visual concept, else a plural."""
    first, second = (match.group("w1") or "").lower(), (match.group("w2") or "").lower()
    if second in _EN_OBJECT and first not in _EN_OBJECT:
        return "w2"
    if first in _EN_OBJECT or count == 1 or first.endswith("s"):
        return "w1"
    return "w2" if second.endswith("s") and second not in REFERENT_STOPWORDS else "w1"


def _singular(noun: str) -> str:
    if noun.endswith("ies") and len(noun) > 4:
        return noun[:-3] + "y"
    if noun.endswith(("ches", "shes", "sses", "xes")):
        return noun[:-2]
    return noun[:-1] if noun.endswith("s") and not noun.endswith("ss") else noun


def _zh_number(text: str) -> int:
    if text.startswith("十"):
        return 10 + (ZH_DIGITS.get(text[1:], 0) if len(text) > 1 else 0)
    if "十" in text:
        tens, _, units = text.partition("十")
        return ZH_DIGITS.get(tens, 1) * 10 + ZH_DIGITS.get(units, 0)
    return ZH_DIGITS.get(text, 0)


def _soft(text: str, position: int) -> bool:
    """Whether the clause before `position` gives advice or a hypothesis rather than describing the image."""
    clause_start, _ = clause_bounds(text, position, position)
    return _SOFT_CUES.search(text[clause_start:position]) is not None


_EN_OBJECT_WORDS = "|".join(sorted((re.escape(word) for word in _EN_OBJECT), key=len, reverse=True))
_EN_PRESENCE = re.compile(
    r"\b(?P<det>an?|some|several|many|few|any|no|one)\s+(?:[a-z-]+\s+)?(?P<noun>" + _EN_OBJECT_WORDS + r")\b"
    r"|\b(?P<pron>nobody|no one|someone|somebody)\b",
    re.IGNORECASE,
)
_EN_NEGATION = re.compile(r"\b(?:not|no|never|without|none)\b|n't\b", re.IGNORECASE)
_ZH_OBJECT_WORDS = "|".join(sorted(_ZH_OBJECT, key=len, reverse=True))
_ZH_PRESENCE = re.compile(
    rf"(?P<verb>没有|没|无|未见|看不到|不见|有|看到|看见|出现|可见)[{_CJK}\d]{{0,2}}?(?P<noun>{_ZH_OBJECT_WORDS})"
    rf"(?![民币])"
)


def _object_claims(text: str, counted: list[tuple[int, int]]) -> tuple[Claim, ...]:
    claims = []
    for match in _EN_PRESENCE.finditer(text):
        if match.group("pron"):
            pron = match.group("pron").lower()
            negated = pron in ("nobody", "no one")
            concept = "person"
        else:
            concept = _EN_OBJECT[match.group("noun").lower()]
            negated = match.group("det").lower() == "no" or _negated_before(text, match.start())
        if _overlaps(match.span(), counted) or (not negated and _soft(text, match.start())):
            continue
        claims.append(Claim("object", match.group(0), concept, negated=negated, span=match.span()))
    for match in _ZH_PRESENCE.finditer(text):
        negated = match.group("verb") in ("没有", "没", "无", "未见", "看不到", "不见")
        if _overlaps(match.span(), counted) or (not negated and _soft(text, match.start())):
            continue
        concept = _ZH_OBJECT[match.group("noun")]
        claims.append(Claim("object", match.group(0), concept, negated=negated, span=match.span()))
    return tuple(claims)


def _overlaps(span: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    return any(start < span[1] and span[0] < end for start, end in spans)


def _negated_before(text: str, position: int) -> bool:
    clause_start, _ = clause_bounds(text, position, position)
    window = text[clause_start:position].split()[-3:]
    return _EN_NEGATION.search(" ".join(window)) is not None
