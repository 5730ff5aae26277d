"""Seeded image-and-answer pairs for `bench/arbitration_eval.py`: images with known content, rendered with Pillow.

Each `Case` is one rendered image with two LLM-style answers: `consistent` (true to the image) and `contradicted`
(the same answer with exactly one injected error, named in `injected`). Families: English and Chinese receipts, price
lists, signs, forms, scenes with a sign, and scenes without text whose error is about objects (out of reach of a
text-reading backend: reported apart).
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

CJK_FONT = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"
MONTH_NAMES = str.split("January February March April May June July August September October November December")


@dataclass(frozen=True)
class Case:
    family: str
    question: str
    png: bytes
    consistent: str
    contradicted: str
    injected: str
    lines: tuple[str, ...] = ()
    """The text drawn on the image: the truth that labels the embedded LLM's own answers (`bench/llm_answers.py`)."""


@dataclass(frozen=True)
class Drawing:
    lines: tuple[str, ...]
    people: int = 0


def render(drawing: Drawing, rng: random.Random) -> bytes:
    size = rng.randint(26, 34)
    height = 80 + int(size * 1.9) * len(drawing.lines) + (220 if drawing.people else 0)
    image = Image.new("RGB", (640, max(height, 200)), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.truetype(CJK_FONT, size)
    y = 40
    for line in drawing.lines:
        draw.text((40, y), line, fill="black", font=font)
        y += int(size * 1.9)
    for person in range(drawing.people):  # stick figures
        x = 80 + person * 110
        draw.ellipse((x, y + 20, x + 40, y + 60), outline="black", width=4)
        draw.line((x + 20, y + 60, x + 20, y + 140), fill="black", width=4)
        draw.line((x + 20, y + 140, x, y + 190), fill="black", width=4)
        draw.line((x + 20, y + 140, x + 40, y + 190), fill="black", width=4)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _money(rng: random.Random, low: int, high: int) -> float:
    return rng.randint(low * 2, high * 2) / 2 + rng.choice((0, 0.1, 0.25, 0.05))


def _other(rng: random.Random, value: float) -> float:
    return round(value + rng.choice((-1, 1)) * rng.choice((1, 2, 5, 0.5, 10, 0.1)), 2)


def _date(rng: random.Random) -> tuple[int, int, int]:
    return rng.randint(2019, 2027), rng.randint(1, 12), rng.randint(1, 28)


def _shift(date: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    year, month, day = date
    step = rng.choice((1, 2, -1)) if day > 1 else rng.choice((1, 2))
    return (year, month, day + step) if rng.random() < 0.6 else (year, month % 12 + 1, day)


def _en_date(date: tuple[int, int, int], rng: random.Random) -> str:
    year, month, day = date
    return rng.choice((f"{MONTH_NAMES[month - 1]} {day}, {year}", f"{year}-{month:02d}-{day:02d}",
                       f"{day} {MONTH_NAMES[month - 1]} {year}"))  # fmt: skip


ITEMS_EN = ("Latte", "Croissant", "Bagel", "Muffin", "Espresso", "Sandwich", "Salad", "Juice", "Tea", "Cookie")
ITEMS_ZH = ("拿铁", "可颂", "贝果", "松饼", "美式", "三明治", "沙拉", "果汁", "红茶", "曲奇")
STORES = ("BLUE BOTTLE CAFE", "CORNER BAKERY", "GREEN LEAF DELI", "SUNRISE DINER", "HARBOR COFFEE")


def receipt_en(rng: random.Random) -> Case:
    names = rng.sample(ITEMS_EN, rng.randint(2, 3))
    prices = [_money(rng, 3, 30) for _ in names]
    qty = [rng.randint(1, 3) for _ in names]
    subtotal = sum(q * p for q, p in zip(qty, prices, strict=True))
    tax = round(subtotal * 0.06, 2)
    total, date = subtotal + tax, _date(rng)
    store = rng.choice(STORES)
    lines = [store, f"{date[0]}-{date[1]:02d}-{date[2]:02d} {rng.randint(8, 21)}:{rng.randint(10, 59)}"]
    lines += [f"{n} {q} x {p:.2f} {q * p:.2f}" for n, q, p in zip(names, qty, prices, strict=True)]
    lines += [f"Subtotal {subtotal:.2f}", f"Tax {tax:.2f}", f"TOTAL {total:.2f}"]
    k = rng.randrange(len(names))
    wrong_date = _shift(date, rng)

    def answer(total_: float, date_: tuple[int, int, int], price: float) -> str:
        return (f"This receipt from {store.title()} is dated {_en_date(date_, rng)}. The {names[k].lower()} costs "
                f"{price:.2f}. The total is {total_:.2f}, which looks like an ordinary meal expense.")  # fmt: skip

    choice = rng.choice(("total", "date", "price"))
    wrong = {"total": (_other(rng, total), date, prices[k]), "date": (total, wrong_date, prices[k]),
             "price": (total, date, _other(rng, prices[k]))}[choice]  # fmt: skip
    return Case("receipt_en", "Can I expense this?", render(Drawing(tuple(lines)), rng),
                answer(total, date, prices[k]), answer(*wrong), choice, tuple(lines))  # fmt: skip


def receipt_zh(rng: random.Random) -> Case:
    index = rng.sample(range(len(ITEMS_ZH)), 2)
    names = [ITEMS_ZH[i] for i in index]
    prices = [_money(rng, 5, 40) for _ in names]
    qty = [rng.randint(1, 4) for _ in names]
    total, date = sum(q * p for q, p in zip(qty, prices, strict=True)), _date(rng)
    lines = ["蓝瓶咖啡 上海店", f"日期 {date[0]}年{date[1]}月{date[2]}日"]
    lines += [f"{n} {q}杯 单价{p:.2f}" for n, q, p in zip(names, qty, prices, strict=True)]
    lines += [f"合计 {total:.2f}元", "谢谢惠顾"]

    def answer(total_: float, date_: tuple[int, int, int], count: int) -> str:
        return (f"这张小票的日期是{date_[0]}年{date_[1]}月{date_[2]}日，买了{count}杯{names[0]}，"
                f"合计{total_:.2f}元，可以作为餐饮费用报销。")  # fmt: skip

    choice = rng.choice(("total", "date", "count"))
    wrong_count = qty[0] + rng.choice((1, 2)) if qty[0] < 3 else qty[0] - 1
    wrong = {"total": (_other(rng, total), date, qty[0]), "date": (total, _shift(date, rng), qty[0]),
             "count": (total, date, wrong_count)}[choice]  # fmt: skip
    return Case("receipt_zh", "这张小票能报销吗？", render(Drawing(tuple(lines)), rng),
                answer(total, date, qty[0]), answer(*wrong), choice, tuple(lines))  # fmt: skip


def price_list(rng: random.Random) -> Case:
    names = rng.sample(ITEMS_EN, 4)
    prices = [_money(rng, 2, 25) for _ in names]
    lines = ("MENU", *(f"{n} {p:.2f}" for n, p in zip(names, prices, strict=True)), "Prices include tax")
    a, b = rng.sample(range(4), 2)
    wrong = _other(rng, prices[b])

    def answer(price_b: float) -> str:
        return (f"The {names[a].lower()} costs {prices[a]:.2f} and the {names[b].lower()} is {price_b:.2f}, "
                f"so the {names[a].lower()} is the better choice if you want something cheap.")  # fmt: skip

    return Case("price_list", "Which is the better deal?", render(Drawing(lines), rng),
                answer(prices[b]), answer(wrong), "price", lines)  # fmt: skip


SIGNS_EN = ("NO PARKING", "NO SMOKING", "STAFF ONLY", "WET FLOOR", "KEEP OUT", "EXIT ONLY", "FIRE EXIT")
SIGNS_ZH = ("禁止吸烟", "禁止停车", "员工通道", "小心地滑", "请勿入内", "安全出口", "禁止拍照")


def sign(rng: random.Random) -> Case:
    chinese = rng.random() < 0.5
    texts = SIGNS_ZH if chinese else SIGNS_EN
    text, misquote = rng.sample(texts, 2)
    start, end = rng.randint(6, 10), rng.randint(17, 22)
    hours = f"{start}:00-{end}:00"
    lines = (text, hours) if not chinese else (text, f"开放时间 {hours}")
    wrong_end = end + rng.choice((1, 2, -1))

    def answer(quote: str, end_: int) -> str:
        if chinese:
            return f"标牌上写着“{quote}”，时间是{start}:00到{end_}:00，请遵守。"
        return f'The sign says "{quote}" and applies from {start}:00 to {end_}:00, so you should follow it.'

    choice = rng.choice(("quote", "time"))
    wrong = answer(misquote, end) if choice == "quote" else answer(text, wrong_end)
    return Case("sign", "这个标志是什么意思？" if chinese else "What should I do here?",
                render(Drawing(lines), rng), answer(text, end), wrong, choice, lines)  # fmt: skip


NAMES = ("Alice Chen", "Brian Wong", "Carla Diaz", "David Kim", "Emma Stone", "Frank Li", "Grace Park", "Henry Zhao")


def form(rng: random.Random) -> Case:
    name, other = rng.sample(NAMES, 2)
    born, signed = _date(rng), _date(rng)
    lines = ("APPLICATION FORM", f"Name: {name}", f"Date of birth: {born[0]}-{born[1]:02d}-{born[2]:02d}",
             f"Signed on {signed[2]:02d}/{signed[1]:02d}/{signed[0]}")  # fmt: skip

    def answer(name_: str, born_: tuple[int, int, int]) -> str:
        return (f"The form was filled in by “{name_}”, born on {_en_date(born_, rng)}. It looks complete, "
                f"but you should check it with the office.")  # fmt: skip

    choice = rng.choice(("name", "date"))
    wrong = answer(other, born) if choice == "name" else answer(name, _shift(born, rng))
    return Case("form", "Is this form complete?", render(Drawing(lines), rng), answer(name, born), wrong, choice,
                lines)  # fmt: skip


SHOPS = ("OPEN", "BAKERY", "PHARMACY", "BOOKS", "FLOWERS")


def scene(rng: random.Random) -> Case:
    shop, other = rng.sample(SHOPS, 2)
    opening = rng.randint(7, 10)
    lines = (shop, f"{opening}:30")
    people = rng.randint(1, 3)

    def answer(shop_: str, hour: int) -> str:
        return (f"A person is walking past a shop whose sign reads “{shop_}”; it opens at {hour}:30, "
                f"so you could go in then.")  # fmt: skip

    choice = rng.choice(("quote", "time"))
    wrong = answer(other, opening) if choice == "quote" else answer(shop, opening + rng.choice((1, 2)))
    return Case("scene", "Can I go in?", render(Drawing(lines, people), rng), answer(shop, opening), wrong, choice,
                lines)  # fmt: skip


def scene_objects(rng: random.Random) -> Case:
    people = rng.randint(1, 3)
    words = ("one", "two", "three", "four")

    def answer(count: int) -> str:
        return f"There {'is' if count == 1 else 'are'} {words[count - 1]} {'person' if count == 1 else 'people'} here."

    return Case("scene_objects", "How many people are there, and why?", render(Drawing((), people), rng),
                answer(people), answer(people + 1), "count")  # fmt: skip


FAMILIES: dict[str, tuple[Callable[[random.Random], Case], int]] = {
    "receipt_en": (receipt_en, 40),
    "receipt_zh": (receipt_zh, 35),
    "price_list": (price_list, 30),
    "sign": (sign, 30),
    "form": (form, 25),
    "scene": (scene, 20),
    "scene_objects": (scene_objects, 10),
}
"""Family → (generator, images); each image gives one consistent and one contradicted answer."""


def generate(seed: int, scale: float = 1.0) -> list[Case]:
    rng = random.Random(seed)
    return [make(rng) for make, count in FAMILIES.values() for _ in range(max(1, round(count * scale)))]
