"""The evaluation's cases (`orchestrator/evaluation/cases.py`) from a user's folder, and the questions' wording in
both languages (`orchestrator/evaluation/canvas.py`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator.evaluation.cases import (
    Case,
    CaseError,
    default_set,
    load_folder,
    load_set,
)

PNG = b"\x89PNG\r\n\x1a\n"


def write_folder(folder: Path, lines: list[str], images: tuple[str, ...] = ("images/a.png",)) -> Path:
    for image in images:
        (folder / image).parent.mkdir(parents=True, exist_ok=True)
        (folder / image).write_bytes(PNG + image.encode())
    (folder / "cases.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def record(**fields: Any) -> str:
    return json.dumps({"id": "a", "image": "images/a.png", "question": "What is the total?", "answers": ["5"]} | fields,
                      ensure_ascii=False)  # fmt: skip


def test_a_valid_folder_loads_in_order_with_defaults_filled_in(tmp_path: Path) -> None:
    full = record(id="b", language="en", category="receipt", kind="reasoning", expected_route="vision_then_reasoning")
    lines = ["# comments and blank lines are skipped", record(), "", full, record(id="c", question="合计多少？")]
    folder = write_folder(tmp_path, lines)

    first, second, third = load_folder(folder)

    image = PNG + b"images/a.png"
    assert first == Case("a", "custom", "en", "What is the total?", "perception", None, ("5",), image, "a.png")
    assert (second.category, second.kind, second.expected_route) == ("receipt", "reasoning", "vision_then_reasoning")
    assert third.language == "zh"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"id": "a", "image": "images/a.png", "question": "q"}', "missing required key(s) 'answers'"),
        (record(answer=["5"]), "unknown key(s) 'answer'"),
        (record(image="images/gone.png"), "image 'images/gone.png' not found"),
        ('{"id": "a", "image": ', "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        (record(answers=[]), "'answers' must be a non-empty list"),
        (record(answers=[5]), "write numbers as strings"),
        (record(kind="perceptoin"), "'kind' must be one of 'perception', 'reasoning'"),
        (record(language="fr"), "'language' must be one of"),
        (record(expected_route="reasoning"), "'expected_route' must be one of"),
        (record(id=""), "'id' must be a non-empty string"),
    ],
    ids=lambda value: value[:24] if isinstance(value, str) else value,
)
def test_a_bad_line_is_refused_naming_the_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    folder = write_folder(tmp_path, ["# first a comment", record(id="ok"), line])

    with pytest.raises(CaseError) as raised:
        load_folder(folder)

    assert str(raised.value).startswith(f"{folder / 'cases.jsonl'}:3: ")
    assert problem in str(raised.value)
    assert raised.value.line == 3


def test_a_duplicate_id_is_refused_naming_both_lines(tmp_path: Path) -> None:
    folder = write_folder(tmp_path, [record(), record(id="b"), record()])

    with pytest.raises(CaseError, match=r"cases\.jsonl:3: duplicate id 'a' \(first on line 1\)"):
        load_folder(folder)


def test_a_folder_without_cases_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CaseError, match=r"cases\.jsonl: no such file"):
        load_folder(tmp_path)
    write_folder(tmp_path, ["# nothing here"])
    with pytest.raises(CaseError, match="no cases"):
        load_folder(tmp_path)


def test_load_set_takes_default_a_folder_or_its_file_and_refuses_anything_else(tmp_path: Path) -> None:
    folder = write_folder(tmp_path, [record()])

    assert load_set("default", seed=3) == default_set(3)
    assert load_set(str(folder)) == load_set(str(folder / "cases.jsonl")) == load_folder(folder)
    with pytest.raises(ValueError, match=r"no case set 'nonsense'.*`default`"):
        load_set("nonsense")


def test_every_category_has_its_questions_worded_alike_in_both_languages() -> None:
    from orchestrator.evaluation.canvas import questions
    from orchestrator.evaluation.cases import DRAWERS

    for category in DRAWERS:
        asked = questions(category)
        assert asked, category
        for slug, question in asked.items():
            assert question.slug == slug
            assert question.kind in ("perception", "reasoning")
    assert {q.kind for category in DRAWERS for q in questions(category).values()} == {"perception", "reasoning"}


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ('kind = "perception"\nen = "What is {item}?"\nzh = "这是什么？"', "placeholders"),
        ('kind = "looking"\nen = "What is it?"\nzh = "这是什么？"', "kind"),
    ],
    ids=["placeholders", "kind"],
)
def test_a_question_worded_unlike_in_the_other_language_or_of_no_known_kind_is_refused(
    entry: str, problem: str
) -> None:
    from orchestrator.evaluation.canvas import read_questions

    assert read_questions('[menu.price]\nkind = "perception"\nen = "{item}?"\nzh = "{item}？"')["menu"]["price"].en
    with pytest.raises(ValueError, match=problem):
        read_questions(f"[menu.what]\n{entry}")
