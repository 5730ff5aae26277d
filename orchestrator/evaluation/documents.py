"""The generated documents: receipts, invoices, menus, price lists and forms, in English or Chinese.

Each function draws one image from `rng`'s values and asks about it: a value read off it (perception) and one that
takes a step of arithmetic (reasoning: the change from a payment, days overdue, an order's cost, an age). Every
answer is computed from the values drawn; money is computed in `Decimal`, never in floats.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal

from orchestrator.analysis.messages import Language
from orchestrator.evaluation.canvas import Anchor, Canvas, Fonts, Picture, questions
from orchestrator.evaluation.wording import CENT, Pair, both, count_answers, money, pick

SHOPS: tuple[Pair, ...] = (
    ("Blue Lotus Cafe", "蓝莲花咖啡"), ("Morning Light Bakery", "晨光面包房"), ("Corner Tea House", "街角茶馆"),
    ("Golden Bean Coffee", "金豆咖啡"), ("Green Leaf Deli", "绿叶餐吧"),
)  # fmt: skip
SNACKS: tuple[Pair, ...] = (
    ("Latte", "拿铁"), ("Americano", "美式咖啡"), ("Croissant", "牛角包"), ("Muffin", "松饼"), ("Sandwich", "三明治"),
    ("Milk Tea", "奶茶"), ("Egg Tart", "蛋挞"), ("Green Tea", "绿茶"), ("Bagel", "贝果"), ("Orange Juice", "橙汁"),
)  # fmt: skip
SELLERS: tuple[Pair, ...] = (
    ("Northwind Supplies", "北风办公用品"), ("Harbor Office Co.", "港湾办公"), ("Summit Trading", "峰顶贸易"),
    ("Bright Paper Ltd.", "明亮纸业"),
)  # fmt: skip
SUPPLIES: tuple[Pair, ...] = (
    ("Printer paper", "打印纸"), ("Ink cartridge", "墨盒"), ("Stapler", "订书机"), ("Desk lamp", "台灯"),
    ("USB cable", "数据线"), ("Notebook", "笔记本"), ("Whiteboard", "白板"),
)  # fmt: skip
RESTAURANTS: tuple[Pair, ...] = (
    ("The Garden Kitchen", "花园小厨"), ("Red Lantern", "红灯笼"), ("Riverside Diner", "河畔餐厅"),
    ("Jade Bowl", "玉碗小馆"),
)  # fmt: skip
DISHES: tuple[Pair, ...] = (
    ("Tomato Soup", "番茄汤"), ("Beef Noodles", "牛肉面"), ("Fried Rice", "炒饭"), ("Dumplings", "饺子"),
    ("Spring Rolls", "春卷"), ("Mapo Tofu", "麻婆豆腐"), ("Green Salad", "蔬菜沙拉"), ("Mango Pudding", "芒果布丁"),
)  # fmt: skip
FRUITS: tuple[Pair, ...] = (
    ("Apples", "苹果"), ("Bananas", "香蕉"), ("Oranges", "橙子"), ("Grapes", "葡萄"), ("Pears", "梨"),
    ("Strawberries", "草莓"), ("Mangoes", "芒果"), ("Peaches", "桃子"),
)  # fmt: skip
PEOPLE: tuple[Pair, ...] = (
    ("Emma Clark", "王小明"), ("Liam Turner", "李静"), ("Olivia Brooks", "张伟"), ("Noah Bennett", "刘洋"),
    ("Ava Morgan", "陈晨"), ("Lucas Reed", "赵敏"),
)  # fmt: skip
TAX_RATES = (5, 6, 8, 10)
PAYMENTS = (Decimal(20), Decimal(50), Decimal(100), Decimal(200), Decimal(500), Decimal(1000))
BODY, TITLE, LINE = 30, 38, 50
"""Font sizes and the line pitch, in pixels."""


_Line = tuple[str, int, Decimal]
"""An item line: name, quantity, unit price."""


def _price(rng: random.Random, low: int, high: int, *, halves: bool = False) -> Decimal:
    """A price between `low` and `high`: any cents, or whole and half units only."""
    if halves:
        return Decimal(rng.randint(low * 2, high * 2)) / 2
    return Decimal(rng.randint(low * 100, high * 100)) / 100


def _items(rng: random.Random, language: Language, pool: Sequence[Pair], count: int, high: int) -> list[_Line]:
    """`count` items of `pool`, each with a quantity of 1–3 and a unit price up to `high`."""
    return [(pick(language, *item), rng.randint(1, 3), _price(rng, 3, high)) for item in rng.sample(pool, count)]


def _bill(canvas: Canvas, y: int, lines: Sequence[_Line], labels: tuple[str, str, str], rate: int) -> Decimal:
    """Draw the item lines with their amounts, then the subtotal, the tax at `rate` % and the total under a rule
    (labels: subtotal, tax with `{rate}`, total); the total."""
    right = canvas.size[0] - 40
    for name, quantity, price in lines:
        cells: list[tuple[float, str, Anchor]] = [
            (40, name, "la"),
            (right * 0.47, f"{quantity} x {money(price)}", "la"),
        ]
        canvas.row(y, [*cells, (right, money(price * quantity), "ra")], BODY)
        y += LINE
    subtotal = sum((price * quantity for _, quantity, price in lines), Decimal(0))
    tax = (subtotal * rate / 100).quantize(CENT, rounding=ROUND_HALF_UP)
    canvas.rule(y + 10, 40, right)
    for index, (label, value) in enumerate(zip(labels, (subtotal, tax, subtotal + tax), strict=True)):
        y += LINE
        canvas.row(y - 20, [(40, label.format(rate=rate), "la"), (right, money(value), "ra")], BODY, bold=index == 2)
    return subtotal + tax


def receipt(rng: random.Random, language: Language, fonts: Fonts) -> Picture:
    shop = rng.choice(SHOPS)
    when = date(2026, 1, 1) + timedelta(days=rng.randrange(120))
    lines = _items(rng, language, SNACKS, rng.randint(2, 4), 30)
    canvas = Canvas(fonts, language, (640, 460 + LINE * len(lines)))
    canvas.text((320, 40), pick(language, shop[0].upper(), shop[1]), TITLE, anchor="ma", bold=True)
    canvas.text((320, 100), f"{when.isoformat()} {rng.randint(8, 20):02d}:{rng.randrange(60):02d}", BODY, anchor="ma")
    canvas.rule(160, 40, 600)
    labels = pick(language, ("Subtotal", "Tax {rate}%", "TOTAL"), ("小计", "税额 {rate}%", "合计"))
    total = _bill(canvas, 180, lines, labels, rng.choice(TAX_RATES))
    canvas.text((320, canvas.size[1] - 70), pick(language, "Thank you!", "谢谢惠顾"), BODY, anchor="ma")
    paid = next(payment for payment in PAYMENTS if payment > total)
    wording = questions("receipt")
    asks = [
        wording["total"].ask(language, (money(total),)),
        wording["shop"].ask(language, both(shop, language)),
        wording["change"].ask(language, (money(paid - total),), paid=paid),
    ]
    return canvas.picture(asks)


def invoice(rng: random.Random, language: Language, fonts: Fonts) -> Picture:
    seller = rng.choice(SELLERS)
    issued = date(2026, 1, 1) + timedelta(days=rng.randrange(90))
    due = issued + timedelta(days=rng.choice((14, 30)))
    today = due + timedelta(days=rng.randint(3, 40))
    number = f"INV-{issued.year}-{rng.randint(1000, 9999)}"
    lines = _items(rng, language, SUPPLIES, rng.randint(2, 3), 150)
    canvas = Canvas(fonts, language, (720, 580 + LINE * len(lines)))
    canvas.text((360, 40), pick(language, "INVOICE", "发票"), TITLE, anchor="ma", bold=True)
    canvas.text((360, 100), pick(language, *seller), BODY, anchor="ma")
    header = pick(language, ("Invoice No.", "Date", "Due date"), ("发票号码", "开票日期", "付款期限"))
    for row, (label, value) in enumerate(zip(header, (number, issued.isoformat(), due.isoformat()), strict=True)):
        canvas.row(170 + LINE * row, [(40, label, "la"), (300, value, "la")], BODY)
    canvas.rule(330, 40, 680)
    labels = pick(language, ("Subtotal", "Tax {rate}%", "Amount due"), ("小计", "税额 {rate}%", "应付金额"))
    total = _bill(canvas, 350, lines, labels, rng.choice(TAX_RATES))
    overdue = count_answers((today - due).days, ("day", "days"), ("天",))
    wording = questions("invoice")
    asks = [
        wording["number"].ask(language, (number,)),
        wording["amount"].ask(language, (money(total),)),
        wording["overdue"].ask(language, overdue, today=today.isoformat()),
    ]
    return canvas.picture(asks)


def _price_table(canvas: Canvas, title: str, subtitle: str, items: Sequence[tuple[str, Decimal]]) -> None:
    """A title, a subtitle and one row per item, name left and price right,."""
    canvas.text((320, 40), title, TITLE, anchor="ma", bold=True)
    canvas.text((320, 100), subtitle, BODY, anchor="ma")
    canvas.rule(160, 60, 580)
    for row, (name, price) in enumerate(items):
        canvas.row(190 + (LINE + 6) * row, [(60, name, "la"), (580, money(price), "ra")], BODY)


def menu(rng: random.Random, language: Language, fonts: Fonts) -> Picture:
    restaurant = rng.choice(RESTAURANTS)
    dishes = [pick(language, *dish) for dish in rng.sample(DISHES, rng.randint(4, 6))]
    canvas = Canvas(fonts, language, (640, 260 + (LINE + 6) * len(dishes)))
    prices = [_price(rng, 8, 48, halves=True) for _ in dishes]
    title = pick(language, restaurant[0].upper(), restaurant[1])
    _price_table(canvas, title, pick(language, "MENU", "菜单"), list(zip(dishes, prices, strict=True)))
    asked, double, single = rng.sample(range(len(dishes)), 3)
    wording = questions("menu")
    asks = [
        wording["price"].ask(language, (money(prices[asked]),), item=dishes[asked]),
        wording["restaurant"].ask(language, both(restaurant, language)),
        wording["order"].ask(
            language, (money(2 * prices[double] + prices[single]),), double=dishes[double], single=dishes[single]
        ),
    ]
    return canvas.picture(asks)


def price_list(rng: random.Random, language: Language, fonts: Fonts) -> Picture:
    fruits = [pick(language, *fruit) for fruit in rng.sample(FRUITS, rng.randint(4, 6))]
    canvas = Canvas(fonts, language, (640, 260 + (LINE + 6) * len(fruits)))
    prices = [_price(rng, 3, 40, halves=True) for _ in fruits]
    title, subtitle = pick(language, ("FRESH MARKET", "Price per kg"), ("鲜果市场", "单价（元/公斤）"))
    _price_table(canvas, title, subtitle, list(zip(fruits, prices, strict=True)))
    asked, several, one = rng.sample(range(len(fruits)), 3)
    kilos = rng.randint(2, 5)
    cost = money(kilos * prices[several] + prices[one])
    wording = questions("price_list")
    asks = [
        wording["price"].ask(language, (money(prices[asked]),), item=fruits[asked]),
        wording["cost"].ask(language, (cost,), kilos=kilos, several=fruits[several], one=fruits[one]),
    ]
    return canvas.picture(asks)


def _age(born: date, on: date) -> int:
    return on.year - born.year - ((on.month, on.day) < (born.month, born.day))


def form(rng: random.Random, language: Language, fonts: Fonts) -> Picture:
    canvas = Canvas(fonts, language, (800, 580))
    person = pick(language, *rng.choice(PEOPLE))
    born = date(1950, 1, 1) + timedelta(days=rng.randrange(365 * 55))
    signed = date(2026, 1, 1) + timedelta(days=rng.randrange(120))
    today = signed + timedelta(days=rng.randrange(400))
    digits = "".join(str(rng.randrange(10)) for _ in range(pick(language, 8, 12)))
    number = pick(language, rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ") + digits, digits)
    canvas.text((400, 40), pick(language, "REGISTRATION FORM", "登记表"), TITLE, anchor="ma", bold=True)
    labels = pick(
        language, ("Name", "Date of birth", "ID number", "Date"), ("姓名", "出生日期", "证件号码", "填表日期")
    )
    for row, (label, value) in enumerate(
        zip(labels, (person, born.isoformat(), number, signed.isoformat()), strict=True)
    ):
        y = 140 + 110 * row
        canvas.draw.rectangle((290, y - 12, 760, y + 52), outline="black", width=2)
        canvas.row(y, [(40, label, "la"), (310, value, "la")], BODY)
    age = count_answers(_age(born, today), ("year old", "years old"), ("岁",))
    wording = questions("form")
    asks = [
        wording["id"].ask(language, (number,)),
        wording["name"].ask(language, (person,)),
        wording["age"].ask(language, age, today=today.isoformat()),
    ]
    return canvas.picture(asks)
