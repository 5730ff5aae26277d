"""What an evaluation run found: the figures (`summarize`), and the three files a run writes (`write`):

- `report.json`: how it was run, the figures, and every case's outcome (question, expected and given answers,
  route, arbitration status, timings);
- `summary.txt`: the figures as a person reads them;
- `chart.png`: answer accuracy by category and language, route accuracy by kind of question, and latency per
  stage (p50 and p95), drawn with Pillow.

Accuracies are over every case run: a case the service refused or failed counts as a wrong answer. Route accuracy
is over the cases that name an expected route and got one. Latencies are the service's own `timings_ms` per stage
(`route`, `vision`, `reasoning`, `arbitration`, `total`), over the cases that ran it, and the whole request as this
client timed it (`request`).
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from orchestrator.evaluation.runner import Outcome

ARBITRATION_STATUSES = ("agreed", "corrected", "needs_review", "skipped")


@dataclass(frozen=True)
class Tally:
    right: int
    cases: int

    @property
    def accuracy(self) -> float | None:
        return self.right / self.cases if self.cases else None

    def as_dict(self) -> dict[str, Any]:
        return {"right": self.right, "cases": self.cases, "accuracy": self.accuracy}


def tally(outcomes: Iterable[Outcome], right: Callable[[Outcome], bool]) -> Tally:
    chosen = list(outcomes)
    return Tally(sum(1 for outcome in chosen if right(outcome)), len(chosen))


def by(outcomes: Sequence[Outcome], key: Callable[[Outcome], str], right: Callable[[Outcome], bool]) -> dict[str, Any]:
    groups = sorted({key(outcome) for outcome in outcomes})
    return {group: tally((o for o in outcomes if key(o) == group), right).as_dict() for group in groups}


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile (q in 0–100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summarize(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """The run's figures (module docstring)."""

    def correct(outcome: Outcome) -> bool:
        return outcome.correct

    routed = [outcome for outcome in outcomes if outcome.route_correct is not None]
    answered = [outcome for outcome in outcomes if outcome.status == 200]
    statuses = Counter(outcome.arbitration or "none" for outcome in answered)
    stages: dict[str, list[float]] = {}
    for outcome in answered:
        for stage, ms in outcome.timings_ms.items():
            stages.setdefault(stage, []).append(ms)
        stages.setdefault("request", []).append(outcome.wall_ms)
    return {
        "cases": len(outcomes),
        "answered": len(answered),
        "errors": dict(Counter((outcome.error or "").split(":")[0] for outcome in outcomes if outcome.status != 200)),
        "answer_accuracy": {
            "overall": tally(outcomes, correct).as_dict(),
            "by_category": by(outcomes, lambda o: o.case.category, correct),
            "by_language": by(outcomes, lambda o: o.case.language, correct),
            "by_kind": by(outcomes, lambda o: o.case.kind, correct),
            "by_category_and_language": by(outcomes, lambda o: f"{o.case.category}/{o.case.language}", correct),
        },
        "route_accuracy": {
            "overall": tally(routed, lambda o: bool(o.route_correct)).as_dict(),
            "by_kind": by(routed, lambda o: o.case.kind, lambda o: bool(o.route_correct)),
        },
        "arbitration": {status: statuses.get(status, 0) for status in (*ARBITRATION_STATUSES, "none")},
        "degraded_share": _share(answered, lambda o: o.degraded),
        "needs_review_share": _share(answered, lambda o: o.needs_review),
        "latency_ms": {
            stage: {"p50": percentile(values, 50), "p95": percentile(values, 95), "n": len(values)}
            for stage, values in stages.items()
        },
    }


def _share(outcomes: Sequence[Outcome], which: Callable[[Outcome], bool]) -> float | None:
    return sum(1 for outcome in outcomes if which(outcome)) / len(outcomes) if outcomes else None


def outcome_record(outcome: Outcome) -> dict[str, Any]:
    case = outcome.case
    return {
        "id": case.id,
        "category": case.category,
        "language": case.language,
        "kind": case.kind,
        "question": case.question,
        "expected": list(case.answers),
        "expected_route": case.expected_route,
        "status": outcome.status,
        "answer": outcome.answer,
        "correct": outcome.correct,
        "route": outcome.route,
        "route_correct": outcome.route_correct,
        "arbitration": outcome.arbitration,
        "degraded": outcome.degraded,
        "needs_review": outcome.needs_review,
        "timings_ms": outcome.timings_ms,
        "request_ms": outcome.wall_ms,
        "error": outcome.error,
    }


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def summary_text(run: dict[str, Any], summary: dict[str, Any]) -> str:
    """The figures as a person reads them."""
    answers, routes = summary["answer_accuracy"], summary["route_accuracy"]

    def rows(title: str, groups: dict[str, Any]) -> list[str]:
        lines = [title]
        for name, figures in groups.items():
            share = f"{figures['right']}/{figures['cases']}"
            lines.append(f"  {name:28} {_percent(figures['accuracy']):>8}  ({share})")
        return lines

    overall = answers["overall"]
    lines = [
        f"set {run['set']} (seed {run['seed']}), {summary['cases']} cases against {run['target']}, "
        f"{run['duration_s']:.1f} s",
        f"models: {', '.join(f'{stage} {model}' for stage, model in run['models'].items()) or 'none answered'}",
        "",
        f"answer accuracy {_percent(overall['accuracy'])} ({overall['right']}/{overall['cases']})",
        *rows("by kind", answers["by_kind"]),
        *rows("by language", answers["by_language"]),
        *rows("by category", answers["by_category"]),
        "",
        f"route accuracy {_percent(routes['overall']['accuracy'])} "
        f"({routes['overall']['right']}/{routes['overall']['cases']})",
        *rows("by kind", routes["by_kind"]),
        "",
        "arbitration: " + ", ".join(f"{status} {count}" for status, count in summary["arbitration"].items()),
        f"degraded {_percent(summary['degraded_share'])}, needs human review {_percent(summary['needs_review_share'])}"
        f", errors {sum(summary['errors'].values())}"
        + (f" ({', '.join(f'{kind} {n}' for kind, n in summary['errors'].items())})" if summary["errors"] else ""),
        "",
        "latency, ms            p50        p95      n",
        *(
            f"  {stage:14} {figures['p50']:>10.1f} {figures['p95']:>10.1f} {figures['n']:>6}"
            for stage, figures in summary["latency_ms"].items()
        ),
    ]
    return "\n".join(lines) + "\n"


# -- the chart

_WIDTH, _BAR, _GAP, _LABEL = 900, 16, 6, 200
_COLOURS = {"en": (31, 95, 191), "zh": (200, 110, 20), "p50": (31, 95, 191), "p95": (140, 170, 220)}


def chart_png(run: dict[str, Any], summary: dict[str, Any]) -> bytes:
    """Answer accuracy by category (a bar per language), route accuracy by kind, latency per stage."""
    by_cell = summary["answer_accuracy"]["by_category_and_language"]
    categories = sorted({cell.split("/")[0] for cell in by_cell})
    languages = sorted({cell.split("/")[1] for cell in by_cell})
    routes = summary["route_accuracy"]["by_kind"]
    stages = summary["latency_ms"]
    row = _BAR + _GAP
    height = 200 + len(categories) * (len(languages) * row + 2 * _GAP) + len(routes) * row
    height += len(stages) * (2 * row + 2 * _GAP) + 100  # more than is drawn: cropped to what was, below
    image = Image.new("RGB", (_WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    font, bold = ImageFont.load_default(size=14), ImageFont.load_default(size=18)
    span = _WIDTH - _LABEL - 90
    overall = summary["answer_accuracy"]["overall"]
    draw.text((20, 16), f"{run['set']}: {summary['cases']} cases, answers {_percent(overall['accuracy'])}",
              fill="black", font=bold)  # fmt: skip
    draw.text((20, 44), f"against {run['target']}", fill=(90, 90, 90), font=font)
    y = 80
    draw.text((20, y), "answer accuracy by category", fill="black", font=bold)
    y += 30
    for category in categories:
        draw.text((20, y), category, fill="black", font=font)
        for language in languages:
            figures = by_cell.get(f"{category}/{language}")
            if figures:
                label = f"{language} {_percent(figures['accuracy'])} ({figures['right']}/{figures['cases']})"
                colour = _COLOURS.get(language, (80, 80, 80))
                y = _bar(draw, y, figures["accuracy"] or 0.0, span, colour, label, font)
        y += _GAP * 2
    y += 20
    draw.text((20, y), "route accuracy by kind of question", fill="black", font=bold)
    y += 30
    for kind, figures in routes.items():
        draw.text((20, y), kind, fill="black", font=font)
        y = _bar(draw, y, figures["accuracy"] or 0.0, span, (28, 107, 53), _percent(figures["accuracy"]), font)
    y += 30
    draw.text((20, y), "latency per stage, ms (p50, p95)", fill="black", font=bold)
    y += 30
    longest = max((figures["p95"] for figures in stages.values()), default=1.0) or 1.0
    for stage, figures in stages.items():
        draw.text((20, y), stage, fill="black", font=font)
        for quantile in ("p50", "p95"):
            value = figures[quantile]
            y = _bar(draw, y, value / longest, span, _COLOURS[quantile], f"{quantile} {value:.0f}", font)
        y += _GAP * 2
    buffer = io.BytesIO()
    image.crop((0, 0, _WIDTH, y + 20)).save(buffer, format="PNG")
    return buffer.getvalue()


def _bar(
    draw: ImageDraw.ImageDraw, y: int, share: float, span: int, colour: tuple[int, int, int], label: str, font: Any
) -> int:
    width = max(1, round(span * min(max(share, 0.0), 1.0)))
    draw.rectangle((_LABEL, y, _LABEL + width, y + _BAR), fill=colour)
    draw.text((_LABEL + width + 6, y), label, fill="black", font=font)
    return y + _BAR + _GAP


def write(out: Path, run: dict[str, Any], outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """`report.json`, `summary.txt` and `chart.png` under `out` (created); the summary."""
    summary = summarize(outcomes)
    out.mkdir(parents=True, exist_ok=True)
    report = {"run": run, "summary": summary, "cases": [outcome_record(outcome) for outcome in outcomes]}
    (out / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (out / "summary.txt").write_text(summary_text(run, summary), encoding="utf-8")
    (out / "chart.png").write_bytes(chart_png(run, summary))
    return summary
