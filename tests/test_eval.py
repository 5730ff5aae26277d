"""`python -m orchestrator eval` (`orchestrator.evaluation`): scoring, the slice a `--limit` takes, and whole runs —
against a service on loopback with fakes (the report checked against the cases run), and in this process on the
embedded models (a small slice of the generated set)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pydantic import SecretStr

from orchestrator.__main__ import main
from orchestrator.api.app import create_app
from orchestrator.evaluation.cases import Case, default_set
from orchestrator.evaluation.report import chart_png, summarize
from orchestrator.evaluation.runner import Outcome, outcome_of, take
from orchestrator.evaluation.scoring import answer_matches
from orchestrator.settings import Settings
from orchestrator.wiring import Backends
from tests.fakes import FakeReasoning, FakeVision
from tests.servers import serving

KEY = "eval-key"


@pytest.mark.parametrize(
    ("answer", "accepted", "expected"),
    [
        ("The total is 54.060 yuan.", ("54.06",), True),
        ("合计¥54.06元", ("54.06",), True),
        ("The total is 154.06.", ("54.06",), False),  # a number is matched whole, not as digits inside another
        ("There are three circles.", ("3", "three", "三"), True),
        ("图中有三个圆。", ("3", "three", "三"), True),
        ("It is from BLUE LOTUS CAFE!", ("Blue Lotus Cafe",), True),
        ("It is from Blue Bottle Cafe.", ("Blue Lotus Cafe",), False),
        ("", ("54.06",), False),
    ],
)
def test_an_answer_is_right_when_it_gives_an_accepted_answer(
    answer: str, accepted: tuple[str, ...], expected: bool
) -> None:
    assert answer_matches(answer, accepted) is expected


def case(id_: str, category: str, language: str = "en", kind: str = "perception") -> Case:
    return Case(id_, category, language, "q?", kind, None, ("1",), b"", f"{id_}.png")  # type: ignore[arg-type]


def test_a_limit_takes_cases_across_every_category_and_language() -> None:
    receipts = [case("r0", "receipt"), case("r1", "receipt", kind="reasoning"), case("r2", "receipt"),
                case("z0", "receipt", "zh")]  # fmt: skip
    cases = [*receipts, case("s0", "sign"), case("s1", "sign"), case("t0", "sign", "zh")]
    assert [c.id for c in take(cases, 3)] == ["r0", "s0", "r1"]
    assert [c.id for c in take(cases, 6)] == ["r0", "s0", "r1", "t0", "z0", "s1"]
    assert take(cases, None) == take(cases, 100) == cases


# -- a whole run against a service on loopback, with fakes

RECEIPT = ("BLUE LOTUS CAFE", "Latte 2 x 18.00 36.00", "TOTAL 54.06")
FOLDER_CASES = [
    # what the fakes answer: the vision stage quotes its last line ("TOTAL 54.06"); the LLM says "The total is 54.06."
    {"id": "total", "question": "What is the total?", "answers": ["54.06"], "kind": "perception",
     "expected_route": "vision_only", "category": "receipt"},
    {"id": "why", "question": "Why is the total 54.06?", "answers": ["54.06"], "kind": "reasoning",
     "expected_route": "vision_then_reasoning", "category": "receipt"},
    {"id": "shop", "question": "What is the name of the shop?", "answers": ["Blue Lotus Cafe"], "category": "receipt"},
    {"id": "change", "question": "If I pay 100, how much change do I get?", "answers": ["45.94"], "kind": "reasoning",
     "expected_route": "vision_then_reasoning", "category": "receipt"},
    {"id": "sign", "question": "这块牌子上写着什么？", "answers": ["出口"], "category": "sign",
     "expected_route": "vision_only"},
]  # fmt: skip
RIGHT = {"total": True, "why": True, "shop": False, "change": False, "sign": False}


def write_folder(folder: Path) -> Path:
    image = Image.new("RGB", (64, 48), "white")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "receipt.png").write_bytes(buffer.getvalue())
    lines = [json.dumps({**entry, "image": "images/receipt.png"}, ensure_ascii=False) for entry in FOLDER_CASES]
    (folder / "cases.jsonl").write_text("# a comment\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return folder


def run_eval(*arguments: str) -> int:
    return main(["eval", *arguments])


def test_a_run_against_a_service_reports_what_each_case_got(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_folder(tmp_path / "set")
    app = create_app(Settings(api_keys=SecretStr(KEY)), Backends(FakeVision(lines=RECEIPT), FakeReasoning()))
    out = tmp_path / "out"
    with serving(app) as server:
        status = run_eval("--set", str(folder), "--url", server.url, "--api-key", KEY, "--out", str(out),
                          "--min-answer-accuracy", "0.4", "--min-route-accuracy", "0.5")  # fmt: skip
    printed = capsys.readouterr()
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    records = {record["id"]: record for record in report["cases"]}
    assert list(records) == [entry["id"] for entry in FOLDER_CASES]
    assert {id_: record["correct"] for id_, record in records.items()} == RIGHT
    assert all(record["status"] == 200 and record["error"] is None for record in records.values())
    assert records["total"]["route"] == "vision_only"
    assert "TOTAL 54.06" in records["total"]["answer"]
    assert records["why"]["route"] == "vision_then_reasoning"
    assert records["why"]["answer"] == "The total is 54.06."
    assert records["why"]["arbitration"] == "agreed"  # 54.06 is on the receipt's total line
    assert records["change"]["arbitration"] is not None
    assert report["run"]["models"] == {"vision": "fake/fake-vision", "reasoning": "fake/fake-llm"}

    summary = report["summary"]
    assert summary["cases"] == summary["answered"] == 5
    assert summary["answer_accuracy"]["overall"] == {"right": 2, "cases": 5, "accuracy": 0.4}
    assert summary["answer_accuracy"]["by_category"]["sign"] == {"right": 0, "cases": 1, "accuracy": 0.0}
    assert summary["answer_accuracy"]["by_language"]["zh"]["cases"] == 1  # detected from the question
    assert summary["answer_accuracy"]["by_kind"]["reasoning"] == {"right": 1, "cases": 2, "accuracy": 0.5}
    routed = [record for record in records.values() if record["expected_route"] is not None]
    right_routes = sum(record["route"] == record["expected_route"] for record in routed)
    assert summary["route_accuracy"]["overall"] == {
        "right": right_routes, "cases": len(routed), "accuracy": right_routes / len(routed)
    }  # fmt: skip
    reasoned = sum(record["route"] == "vision_then_reasoning" for record in records.values())
    assert summary["arbitration"]["skipped"] + summary["arbitration"]["none"] >= 5 - reasoned
    assert sum(summary["arbitration"].values()) == 5
    assert summary["latency_ms"]["request"]["n"] == 5
    assert summary["latency_ms"]["reasoning"]["n"] == reasoned
    assert summary["latency_ms"]["total"]["p50"] <= summary["latency_ms"]["total"]["p95"]

    assert status == (0 if right_routes / len(routed) >= 0.5 else 1)
    text = (out / "summary.txt").read_text(encoding="utf-8")
    assert "answer accuracy 40.0 % (2/5)" in text
    assert text in printed.out
    assert "5/5 2 right" in printed.err  # the progress line after the last case
    with Image.open(out / "chart.png") as chart:
        assert chart.format == "PNG"
        assert chart.width == 900


def test_a_missed_threshold_exits_1_and_says_which(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_folder(tmp_path / "set")
    app = create_app(Settings(), Backends(FakeVision(lines=RECEIPT), FakeReasoning()))
    with serving(app) as server:
        status = run_eval("--set", str(folder), "--url", server.url, "--out", str(tmp_path / "out"),
                          "--min-answer-accuracy", "0.9", "--min-perception-accuracy", "0.2")  # fmt: skip
    err = capsys.readouterr().err
    assert status == 1
    assert "THRESHOLD MISSED: answer accuracy 0.400 < 0.9 (--min-answer-accuracy)" in err
    assert "perception" not in err.split("THRESHOLD MISSED")[-1]  # 1/3 perception answers: that one is met


def test_a_service_that_refuses_the_key_counts_every_case_as_an_error(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "set")
    app = create_app(Settings(api_keys=SecretStr(KEY)), Backends(FakeVision(lines=RECEIPT), FakeReasoning()))
    with serving(app) as server:
        status = run_eval("--set", str(folder), "--url", server.url, "--api-key", "wrong", "--out", str(tmp_path),
                          "--min-answer-accuracy", "0.1")  # fmt: skip
    summary = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))["summary"]
    assert status == 1
    assert (summary["answered"], summary["errors"]) == (0, {"api_key_invalid": 5})
    assert summary["answer_accuracy"]["overall"] == {"right": 0, "cases": 5, "accuracy": 0.0}


def test_an_unreachable_service_or_a_bad_set_exits_2_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = write_folder(tmp_path / "set")
    assert run_eval("--set", str(folder), "--url", "http://127.0.0.1:9", "--out", str(tmp_path / "a")) == 2
    assert "did not answer /health" in capsys.readouterr().err
    (folder / "cases.jsonl").write_text('{"id": "x"}\n', encoding="utf-8")
    assert run_eval("--set", str(folder), "--out", str(tmp_path / "b")) == 2
    assert "cases.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "b").exists()


# -- in this process, on the embedded models


@pytest.mark.slow
def test_a_slice_of_the_generated_set_runs_in_process_on_the_embedded_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, embedded_model_cache: Path
) -> None:
    for name in list(os.environ):
        if name.startswith("ORCH_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("ORCH_REASONING__CACHE_DIR", str(embedded_model_cache))
    monkeypatch.setenv("ORCH_REASONING__MAX_NEW_TOKENS", "40")
    status = run_eval("--limit", "4", "--out", str(tmp_path))
    report: dict[str, Any] = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert status == 0
    records = report["cases"]
    assert len(records) == 4
    assert report["summary"]["cases"] == 4
    generated = {c.id: c for c in default_set(0)}
    assert len({generated[record["id"]].category for record in records}) == 4  # the slice spans categories
    assert all(record["status"] == 200 for record in records), [record["error"] for record in records]
    right = sum(record["correct"] for record in records)
    assert report["summary"]["answer_accuracy"]["overall"]["right"] == right
    assert report["run"]["models"]["vision"].startswith("ocr/")


def test_the_chart_holds_every_stage_down_to_the_last() -> None:
    stages = ("route", "vision", "reasoning", "arbitration", "total", "vision_answer", "cache")
    outcomes = [
        Outcome(case(f"c{n}", category, language), 200, correct=n % 2 == 0, timings_ms=dict.fromkeys(stages, 10.0 * n))
        for n, (category, language) in enumerate(
            (category, language) for category in ("receipt", "sign", "chart", "form") for language in ("en", "zh")
        )
    ]
    summary = summarize(outcomes)
    assert len(summary["latency_ms"]) == len(stages) + 1  # and the request as timed
    with Image.open(io.BytesIO(chart_png({"set": "s", "target": "t"}, summary))) as chart:
        pixels = chart.convert("L")
        width, height = pixels.size
        bottom = pixels.crop((0, height - 10, width, height)).tobytes()
        last_bars = pixels.crop((200, height - 70, width, height - 10)).tobytes()
    assert min(bottom) == 255  # a white margin: nothing was cut off
    assert min(last_bars) < 200  # the last stage's bars are there


@pytest.mark.slow
def test_in_process_the_api_key_is_sent_when_the_settings_name_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("ORCH_"):
            monkeypatch.delenv(name)
    for name, value in {
        "ORCH_API_KEYS": KEY,
        "ORCH_REASONING__BACKEND": "none",
        "ORCH_ROUTER__KIND": "keyword",
    }.items():
        monkeypatch.setenv(name, value)
    folder = write_folder(tmp_path / "set")
    assert run_eval("--set", str(folder), "--api-key", KEY, "--out", str(tmp_path / "keyed")) == 0
    keyed = json.loads((tmp_path / "keyed" / "report.json").read_text(encoding="utf-8"))["summary"]
    assert (keyed["answered"], keyed["errors"]) == (5, {})
    assert run_eval("--set", str(folder), "--out", str(tmp_path / "keyless")) == 0
    keyless = json.loads((tmp_path / "keyless" / "report.json").read_text(encoding="utf-8"))["summary"]
    assert (keyless["answered"], keyless["errors"]) == (0, {"api_key_missing": 5})


def test_a_response_of_another_shape_is_read_as_far_as_it_goes() -> None:
    """Another version of the service: a part missing or shaped otherwise is left out, never a crash of the run."""
    odd = {"answer": "TOTAL 54.06", "route": "vision_only", "arbitration": ["agreed"],
           "timings_ms": {"vision": 12.5, "note": "n/a", "flag": True}, "vision": "ocr"}  # fmt: skip
    outcome = outcome_of(case("x", "receipt"), 200, odd, 3.0)
    assert outcome.answer == "TOTAL 54.06"
    assert (outcome.route, outcome.route_correct, outcome.arbitration) == (None, None, None)
    assert outcome.timings_ms == {"vision": 12.5}
    assert outcome.models == {}
    refused = outcome_of(case("y", "receipt"), 503, {"error": "overloaded"}, 1.0)
    assert (refused.status, refused.error, refused.correct) == (503, "http_error:", False)
    assert outcome_of(case("z", "receipt"), 502, None, 1.0).error == "http_error:"
