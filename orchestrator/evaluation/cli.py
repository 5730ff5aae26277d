"""`python -m orchestrator eval`: a joint test set through both stages, scored, with thresholds that can gate a model
upgrade.

    python -m orchestrator eval [--set default|FOLDER] [--seed N] [--limit N] [--url URL] [--api-key KEY]
                                [--out DIR] [--concurrency N] [--min-answer-accuracy X] [--min-route-accuracy X]
                                [--min-perception-accuracy X] [--min-reasoning-accuracy X]

Without `--url` it runs in this process on the models the `ORCH_*` settings name (the embedded ones by default);
with it, against a running service. `--api-key` (or `ORCH_EVAL_API_KEY`) is sent when the service needs one (its
`ORCH_API_KEYS`), in this process too. It writes
`report.json`, `summary.txt` and `chart.png` under `--out` (`orchestrator.evaluation.report`), prints the summary,
and exits 1 when a `--min-*` threshold (a share, 0–1) is missed, 2 when it could not run (a bad set, an
unreachable service).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestrator.evaluation import report
from orchestrator.evaluation.cases import CaseError, load_set
from orchestrator.evaluation.runner import Outcome, ServiceUnreachable, at_url, in_process, run_cases, take

THRESHOLDS = {
    "min_answer_accuracy": ("answer accuracy", ("answer_accuracy", "overall")),
    "min_route_accuracy": ("route accuracy", ("route_accuracy", "overall")),
    "min_perception_accuracy": ("perception answer accuracy", ("answer_accuracy", "by_kind", "perception")),
    "min_reasoning_accuracy": ("reasoning answer accuracy", ("answer_accuracy", "by_kind", "reasoning")),
}


def add_parser(commands: Any) -> None:
    """The `eval` command's arguments, on the command line's subparsers."""
    parser = commands.add_parser("eval", help="run a joint test set through both stages and score it",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--set", default="default", help="`default` (generated) or a folder with cases.jsonl")
    parser.add_argument("--seed", type=int, default=0, help="the generated set's seed (default: 0)")
    parser.add_argument("--limit", type=_positive, help="run at most N cases, taken across every category")
    parser.add_argument("--url", help="a running service's base URL; without it, the service runs in this process")
    parser.add_argument("--api-key", default=os.environ.get("ORCH_EVAL_API_KEY"), help="the service's API key")
    parser.add_argument("--out", type=Path, default=Path("eval-report"), help="where the report goes")
    parser.add_argument("--concurrency", type=_positive, default=1, help="cases at once (default 1: lone latencies)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default 300)")
    for option, (label, _) in THRESHOLDS.items():
        parser.add_argument(f"--{option.replace('_', '-')}", type=_share, metavar="X",
                            help=f"exit 1 when the {label} is below X (0–1)")  # fmt: skip


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a share from 0 to 1, not {value}")
    return value


def run(args: argparse.Namespace) -> int:
    """The `eval` command (module docstring); its exit status."""
    try:
        cases = take(load_set(args.set, args.seed), args.limit)
    except (CaseError, ValueError, OSError) as exc:
        print(f"cannot load the set {args.set!r}: {exc}", file=sys.stderr)
        return 2
    if not cases:
        print(f"the set {args.set!r} has no cases", file=sys.stderr)
        return 2
    started, clock = datetime.now(UTC), time.perf_counter()
    try:
        outcomes = asyncio.run(_run(args, cases))
    except ServiceUnreachable as exc:
        print(f"cannot evaluate: {exc}", file=sys.stderr)
        return 2
    models: dict[str, str] = {}
    for outcome in outcomes:
        models = {**outcome.models, **models}
    meta = {
        "set": args.set,
        "seed": args.seed,
        "limit": args.limit,
        "target": args.url or "this process (ORCH_* settings)",
        "models": models,
        "started": started.isoformat(timespec="seconds"),
        "duration_s": time.perf_counter() - clock,
        "concurrency": args.concurrency,
    }
    summary = report.write(args.out, meta, outcomes)
    print(report.summary_text(meta, summary), end="")
    print(f"report: {args.out / 'report.json'}, {args.out / 'summary.txt'}, {args.out / 'chart.png'}")
    missed = missed_thresholds(args, summary)
    for line in missed:
        print(f"THRESHOLD MISSED: {line}", file=sys.stderr)
    return 1 if missed else 0


def missed_thresholds(args: argparse.Namespace, summary: dict[str, Any]) -> list[str]:
    """Each `--min-*` threshold the summary falls short of; a figure with no cases behind it misses its threshold."""
    missed = []
    for option, (label, path) in THRESHOLDS.items():
        bound = getattr(args, option, None)
        if bound is None:
            continue
        figures: Any = summary
        for key in path:
            figures = figures.get(key, {}) if isinstance(figures, dict) else {}
        value = figures.get("accuracy") if isinstance(figures, dict) else None
        if value is None or value < bound:
            shown = "no cases" if value is None else f"{value:.3f}"
            missed.append(f"{label} {shown} < {bound} (--{option.replace('_', '-')})")
    return missed


async def _run(args: argparse.Namespace, cases: list[Any]) -> list[Outcome]:
    progress = Progress(len(cases))
    if args.url:
        async with at_url(args.url, args.api_key, args.timeout) as client:
            return await run_cases(client, cases, concurrency=args.concurrency, on_done=progress.done)
    print("loading the models named by the ORCH_* settings…", file=sys.stderr)
    async with in_process(args.api_key, args.timeout) as client:
        return await run_cases(client, cases, concurrency=args.concurrency, on_done=progress.done)


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, one line per case elsewhere (a CI log)."""

    def __init__(self, total: int) -> None:
        self.total, self.count, self.right = total, 0, 0
        self.live = sys.stderr.isatty()

    def done(self, outcome: Outcome) -> None:
        self.count += 1
        self.right += outcome.correct
        filled = round(24 * self.count / self.total)
        mark = "right" if outcome.correct else (f"error {outcome.status}" if outcome.status != 200 else "wrong")
        line = (f"[{'#' * filled}{'.' * (24 - filled)}] {self.count}/{self.total} {self.right} right; "
                f"{outcome.case.id}: {mark}, {outcome.wall_ms:.0f} ms")  # fmt: skip
        end = "\n" if not self.live or self.count == self.total else ""
        print(f"\r{line}\033[K" if self.live else line, end=end, file=sys.stderr, flush=True)
