"""The generated pictures: signs, dialog screenshots, bar charts and scenes of shapes, in English or Chinese.

As in `documents`, each function draws one image from `rng`'s values and asks what it shows (perception) and what
follows from it in a step (reasoning: hours a rule applies, items left, the gap between two bars, one count less
another), with every answer computed from the values drawn. A chart's bars carry their values as text, so a text
reader can answer from them; a scene has no text at all.
"""

from __future__ import annotations

import random

from orchestrator.analysis.messages import Language
from orchestrator.evaluation.canvas import Canvas, Colour, Fonts, Picture, questions
from orchestrator.evaluation.wording import Pair, both, count_answers, pick

SIGNS: tuple[Pair, ...] = (
    ("NO PARKING", "禁止停车"), ("LOADING ZONE", "装卸区"), ("STAFF ONLY", "员工专用"), ("NO ENTRY", "禁止驶入"),
    ("QUIET ZONE", "安静区域"), ("BUS LANE", "公交专用道"),
)  # fmt: skip
SIGN_COLOURS: tuple[Colour, ...] = ((178, 34, 34), (20, 70, 160), (0, 110, 60))
DIALOGS: tuple[tuple[Pair, Pair, Pair], ...] = (
    (("Save changes", "保存更改"), ("Save", "保存"), ("saves the changes", "保存更改")),
    (("Delete files", "删除文件"), ("Delete", "删除"), ("deletes the files", "删除文件")),
    (("Send report", "发送报告"), ("Send", "发送"), ("sends the report", "发送报告")),
    (("Upload photos", "上传照片"), ("Upload", "上传"), ("uploads the photos", "上传照片")),
    (("Print pages", "打印页面"), ("Print", "打印"), ("prints the pages", "打印页面")),
)
"""(title, confirming button, what the button does)"""
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")  # fmt: skip
PALETTE: tuple[tuple[str, Colour], ...] = (
    ("red", (220, 50, 47)), ("blue", (38, 110, 210)), ("green", (40, 160, 70)), ("orange", (245, 140, 20)),
    ("purple", (130, 70, 180)),
)  # fmt: skip
BACKGROUNDS: tuple[Colour, ...] = ((250, 246, 235), (236, 244, 250), (240, 240, 240), (246, 240, 250))


def sign(rng: random.Random, language: Language, fonts: Fonts) -> Picture:
    canvas = Canvas(fonts, language, (800, 500), background=(225, 225, 225))
    text = rng.choice(SIGNS)
    start, end = rng.randint(6, 10), rng.randint(16, 22)
    colour = rng.choice(SIGN_COLOURS)
    canvas.draw.rounded_rectangle((40, 40, 760, 460), radius=30, fill="white", outline=colour, width=24)
    canvas.draw.rectangle((64, 280, 736, 290), fill=colour)
    lines = pick(language, text[0].split(), [text[1]])  # a word a line: OCR doubles letters across wide gaps
    for row, line in enumerate(lines):
        canvas.text((400, 170 + 80 * (row - (len(lines) - 1) / 2)), line, 64, fill=colour, anchor="mm", bold=True)
    hours = f"{start:02d}:00 - {end:02d}:00"
    canvas.text((400, 370), pick(language, f"DAILY {hours}", f"每天 {hours}"), 48, anchor="mm")
    wording = questions("sign")
    asks = [
        wording["text"].ask(language, both(text, language)),
        wording["hours"].ask(language, count_answers(end - start, ("hour", "hours"), ("小时", "个小时"))),
    ]
    return canvas.picture(asks)


def _buttons(canvas: Canvas, labels: list[str]) -> None:
    """Buttons in a row ending at the dialog's right edge, the last (the confirming one) filled."""
    right = 770
    for index, label in enumerate(reversed(labels)):
        width = max(130, canvas.width(label, 30, bold=True) + 50)
        fill, ink = ((47, 93, 158), "white") if index == 0 else ((240, 240, 240), "black")
        canvas.draw.rounded_rectangle((right - width, 410, right, 480), radius=12, fill=fill, outline=(47, 93, 158))
        canvas.text((right - width / 2, 445), label, 30, fill=ink, anchor="mm", bold=True)
        right -= int(width) + 30


def ui(rng: random.Random, language: Language, fonts: Fonts) -> Picture:
    canvas = Canvas(fonts, language, (900, 600), background=(223, 227, 232))
    title, button, action = rng.choice(DIALOGS)
    total = rng.randint(4, 12)
    done = rng.randint(1, total - 1)
    canvas.draw.rectangle((100, 80, 800, 520), fill="white", outline=(120, 120, 120), width=2)
    canvas.draw.rectangle((100, 80, 800, 150), fill=(47, 93, 158))
    canvas.text((130, 115), pick(language, *title), 34, fill="white", anchor="lm", bold=True)
    canvas.text((130, 200), pick(language, f"{done} of {total} items are ready.", f"共{total}项，已完成{done}项。"), 30)
    canvas.text((130, 260), pick(language, "Do you want to continue?", "是否继续？"), 30)
    labels = [pick(language, "Cancel", "取消"), pick(language, *button)]
    if rng.random() < 0.5:
        labels.insert(0, pick(language, "Help", "帮助"))
    _buttons(canvas, labels)
    wording = questions("ui")
    asks = [
        wording["title"].ask(language, both(title, language)),
        wording["button"].ask(language, both(button, language), action=pick(language, *action)),
        wording["remaining"].ask(language, count_answers(total - done, ("item", "items"), ("项", "个"))),
    ]
    return canvas.picture(asks)


def chart(rng: random.Random, language: Language, fonts: Fonts) -> Picture:
    canvas = Canvas(fonts, language, (900, 640))
    count = rng.randint(4, 6)
    first = rng.randrange(12 - count + 1)
    months = [
        pick(language, (MONTHS[month][:3], MONTHS[month]), (f"{month + 1}月",) * 2)
        for month in range(first, first + count)
    ]
    values = rng.sample(range(10, 100), count)
    canvas.text((450, 30), pick(language, "Monthly sales", "月销售额"), 36, anchor="ma", bold=True)
    floor, top, step = 540, 130, 760 // count
    canvas.rule(floor, 60, 840)
    for slot, ((label, _), value) in enumerate(zip(months, values, strict=True)):
        centre = 70 + step * slot + step // 2
        height = (floor - top) * value / 100
        canvas.draw.rectangle((centre - step * 0.3, floor - height, centre + step * 0.3, floor), fill=(70, 120, 190))
        canvas.text((centre, floor - height - 38), str(value), 30, anchor="ma", record=False)
        canvas.text((centre, floor + 14), label, 30, anchor="ma", record=False)
        canvas.record_row(label, str(value))
    asked = rng.randrange(count)
    wording = questions("chart")
    asks = [
        wording["tallest"].ask(language, (str(max(values)),)),
        wording["month"].ask(language, (str(values[asked]),), month=months[asked][1]),
        wording["gap"].ask(language, (str(max(values) - min(values)),)),
    ]
    return canvas.picture(asks)


def scene(rng: random.Random, language: Language, fonts: Fonts) -> Picture:
    canvas = Canvas(fonts, language, (900, 600), background=rng.choice(BACKGROUNDS))
    circles = rng.randint(2, 7)
    counts = {"circle": circles, "square": rng.randint(1, 5), "triangle": rng.randint(1, circles - 1)}
    kinds = [kind for kind, number in counts.items() for _ in range(number)]
    for kind, cell in zip(kinds, rng.sample(range(6 * 4), len(kinds)), strict=True):
        row, column = divmod(cell, 6)
        centre = (75 + 150 * column + rng.randint(-15, 15), 75 + 150 * row + rng.randint(-15, 15))
        canvas.shape(kind, centre, rng.randint(38, 55), rng.choice(PALETTE))
    wording = questions("scene")
    asks = [
        wording["circles"].ask(language, count_answers(circles, ("circle", "circles"), ("个",))),
        wording["squares"].ask(language, count_answers(counts["square"], ("square", "squares"), ("个",))),
        wording["difference"].ask(
            language, count_answers(circles - counts["triangle"], ("circle", "circles"), ("个",))
        ),
    ]
    return canvas.picture(asks)
