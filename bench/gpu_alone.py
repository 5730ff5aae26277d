"""The GPU benchmarks' measures of one request alone (`bench/gpu_common.py` runs them among the others): the first
token of a lone request on each path, its samples listed with the engine's wait to be admitted and the GPU's clock,
decode at batch 1, and the first token at a prompt length not met before."""

from __future__ import annotations

import contextlib
import itertools
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batch_engine.host import launch_pace

if TYPE_CHECKING:
    from bench.gpu_common import Paths, Row
    from bench.gpu_vision import Bench


def median_of(rounds: int, measure: Callable[[], float]) -> float:
    measure()  # warm-up
    return statistics.median(measure() for _ in range(rounds))


ONE_REQUEST_ROWS = (
    "first token, one request, ms (p50)",
    "decode at batch 1, ms/token",
    "first token at a prompt length not met before, ms (p50)",
)
"""The labels of `one_request`'s rows, in order."""


@dataclass(frozen=True)
class Prompts:
    """A benchmark's prompts: `one` (the same each time), `fresh` (one not seen before), `new_length(n)` (one not seen
    before, its length the `n`-th of a sequence of lengths new to each path: each path takes n = 1, 2, … so that both
    meet the same lengths), and `forget`, which drops what the engine kept of one (so that a second run is
    cold too)."""

    one: Any
    fresh: Callable[[], Any]
    forget: Callable[[], None]
    new_length: Callable[[int], Any]

    def lengthening(self) -> Callable[[], Any]:
        """`new_length` at n = 1, 2, … on each call."""
        lengths = itertools.count(1)
        return lambda: self.new_length(next(lengths))


FIRST_TOKEN_SAMPLES = 3
"""Samples of a lone first token per round of `--rounds`, each path (each takes 63–230 ms): the p50 of three swung by
16–19 ms between two runs of the benchmark on H100s, where the engine alone gave 63–65 ms with about one sample in nine
7–60 ms longer (bench/RESULTS.md); more samples, listed, show whether slow ones are a few or a level."""

Sample = tuple[Any, int | None]
"""One of the engine's lone requests: its completion, and the GPU's SM clock read just after it."""


@dataclass(frozen=True)
class EngineAlone:
    """The engine's measures of one request alone (`engine_alone`): its lone first tokens on prompts of one length and
    at lengths not met before, and its decode ms/token at batch 1."""

    first: list[Sample]
    decode: float
    new: list[Sample]


def engine_alone(bench: Paths, rounds: int, prompts: Prompts) -> EngineAlone:
    """The engine's first token of one request alone, each on an image not seen before; its decode ms/token at batch
    1 (`engine_decode`); then its first token at prompt lengths not met before (`Prompts.new_length`): the first
    meeting of a shape costs what the steady runs do not show (cuDNN's attention builds a plan for each,
    `bench/gpu_sdpa_shapes.py`), and a service meets many lengths. `FIRST_TOKEN_SAMPLES` a round of each first token."""
    count = FIRST_TOKEN_SAMPLES * rounds
    first = engine_lone_requests(bench, count, prompts.fresh)
    decode = engine_decode(bench, rounds, prompts.fresh, prompts.forget)
    return EngineAlone(first, decode, engine_lone_requests(bench, count, prompts.lengthening()))


def one_request(bench: Paths, rounds: int, prompts: Prompts, engine: EngineAlone) -> tuple[list[Row], list[str]]:
    """Plain `generate`'s measures of one request alone, after the engine's (`engine_alone`): its first token on
    `Prompts.one` each time (it keeps nothing between calls; a p50 of `FIRST_TOKEN_SAMPLES` a round), decode ms/token
    at batch 1, (t(1 + 64) − t(1)) / 64, and its first token at the same new lengths as the engine's; the rows of both,
    and a note listing the engine's samples in the order taken."""
    one, count = prompts.one, FIRST_TOKEN_SAMPLES * rounds
    plain_first = median_of(count, lambda: bench.plain(one, 1)[0])
    plain_full = median_of(max(1, rounds // 2), lambda: bench.plain(one, 1 + 64)[0])
    new_length = prompts.lengthening()
    plain_new = median_of(count, lambda: bench.plain(new_length(), 1)[0])
    first, decode, new = ONE_REQUEST_ROWS
    rows = [
        (first, plain_first, statistics.median(done.first_token_ms for done, _ in engine.first)),
        (decode, (plain_full - plain_first) / 64, engine.decode),
        (new, plain_new, statistics.median(done.first_token_ms for done, _ in engine.new)),
    ]

    def listed(figure: Callable[[Any, int | None], str]) -> str:
        return "; at a new length ".join(
            " ".join(figure(done, clock) for done, clock in samples) for samples in (engine.first, engine.new)
        )

    first_tokens = listed(lambda done, _: f"{done.first_token_ms:.1f}")
    waits = listed(lambda done, _: f"{done.queue_ms:.1f}")
    notes = [
        f"the engine's lone first tokens, ms, in the order taken: {first_tokens}",
        f"of which waiting to be admitted (submit → admitted), ms: {waits}",
    ]
    if any(clock is not None for _, clock in engine.first + engine.new):
        notes.append(f"the GPU's SM clock read after each, MHz: {listed(lambda _, clock: str(clock))}")
    return rows, notes


def engine_lone_requests(bench: Paths, count: int, prompt: Callable[[], Any], *, warm_up: bool = True) -> list[Sample]:
    """The engine's completions of one request alone, `count` times (after one more, untimed, with `warm_up`), each
    on a prompt `prompt` makes, and the GPU's SM clock read just after each (`sm_clock`)."""

    def once() -> Sample:
        _, (done,) = bench.engine_run([prompt()], 1)
        return done, sm_clock(bench.device)

    sm_clock(bench.device)  # NVML starts up here, not between two samples
    if warm_up:
        once()
    return [once() for _ in range(count)]


def lone_turns(
    bench: Bench,
    rounds: int,
    turns: Sequence[str],
    side: Callable[[str], contextlib.AbstractContextManager[Any]],
    *,
    warm_up: bool = True,
) -> tuple[dict[str, list[float]], list[str]]:
    """Lone first tokens through the engine in `turns` (side names, e.g. before, engine, engine, before: a machine
    that drifts within the run weighs on both sides alike), each turn `engine_lone_requests` of `rounds` (after one
    untimed, with `warm_up`) on images not seen before, inside `side(name)`: each side's samples over its turns, and
    each turn's samples in the order taken."""
    samples: dict[str, list[float]] = {name: [] for name in turns}
    listed = []
    seeds = iter(range(7000, 10**6))
    for name in turns:
        with side(name):
            taken = [
                float(done.first_token_ms)
                for done, _ in engine_lone_requests(bench, rounds, lambda: bench.prompt(next(seeds)), warm_up=warm_up)
            ]
        samples[name] += taken
        listed.append(f"{name}: " + " ".join(f"{ms:.1f}" for ms in taken))
    return samples, listed


def compare_lone(
    description: str,
    order: Sequence[str],
    labels: dict[str, str],
    run: Callable[[Bench, int], tuple[dict[str, list[float]], list[str]]],
    notes: Callable[[Bench], list[str]] = lambda bench: [],
    **engine: Any,
) -> None:
    """A script comparing lone first tokens of two sides in turns (`lone_turns`, through `run(bench, rounds)`): its
    options (`--tiny`, `--rounds`, `--image-side`), the engine as `bench/gpu_vision.py --compile` builds it (32
    slots, cuDNN's attention planned per power of two as the service plans it; `engine`: other settings of
    `bench.gpu_common.start_engine`, the engine's defaults otherwise, so prefills replay as CUDA graphs where the start
    finds the host slow, as the start line says) with the heap frozen, and its table: `labels` names the baseline
    side, then ours; `notes(bench)`, taken after the turns, adds lines under it."""
    import argparse
    import gc

    from batch_engine.attention_plans import plan_by_power_of_two
    from bench.gpu_vision import build, describe

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU: proves the code path")
    parser.add_argument("--rounds", type=int, default=8, help="lone requests a turn (default: 8)")
    parser.add_argument("--image-side", type=int, default=1024)
    args = parser.parse_args()
    side = 64 if args.tiny else args.image_side
    plan_by_power_of_two()  # the engine's default, as `bench.gpu_options.parsed` and the backends set it
    bench = build(args.tiny, side, 16, slots=2 if args.tiny else 32, compile_layers=not args.tiny, **engine)
    gc.collect()
    gc.freeze()
    paced = launch_pace(bench.device)
    try:
        samples, turns = run(bench, args.rounds)
        paces = pace_note(paced, bench.device, "turns")
        added = notes(bench)
    finally:
        bench.engine.close()
        gc.unfreeze()
    (baseline, was_label), (ours, now_label) = labels.items()
    was, now = statistics.median(samples[baseline]), statistics.median(samples[ours])
    print(f"| measure | {baseline}: {was_label} | {ours}: {now_label} | speed-up |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| first token, one request, ms (p50 of {len(samples[ours])}) | {was:.1f} | {now:.1f} | {was / now:.2f}× |")
    print()
    print(f"- turns in the order taken ({' '.join(order)}), ms: " + "; ".join(turns))
    print(f"- {paces}")
    for note in added:
        print(f"- {note}")
    print()
    print(describe(bench))


def sm_clock(device: str) -> int | None:
    """The GPU's SM clock in MHz as NVML reads it now (`torch.cuda.clock_rate`): below the card's maximum while its
    power cap or temperature holds it back. Read just after a request, with the GPU idle again, it tells the clock
    near that request, not during it. None on the CPU or without NVML (the `nvidia-ml-py` package)."""
    if device != "cuda":
        return None
    import torch

    try:
        return int(torch.cuda.clock_rate())
    except Exception:  # no NVML here, or it cannot read this card
        return None


def pace_note(before: float, device: str, what: str) -> str:
    """The host's pace (`launch_pace`) measured `before` the `what` and now, after them, as a report's note."""
    return (
        f"the host's pace: a one-element add launched in {before:.1f} µs before the {what}, "
        f"{launch_pace(device):.1f} after (p50 of 5 × 2000; an eager prefill pays one per kernel)"
    )


def engine_first_token(bench: Paths, rounds: int, prompt: Callable[[], Any]) -> float:
    """The engine's first token of one request alone (p50 of `rounds`), each on a prompt `prompt` makes."""
    return statistics.median(float(done.first_token_ms) for done, _ in engine_lone_requests(bench, rounds, prompt))


def engine_decode(bench: Paths, rounds: int, fresh: Callable[[], Any], forget: Callable[[], None]) -> float:
    """The engine's decode ms/token at batch 1 (p50): (t(1 + 64) − t(1)) / 64 on one cold prompt."""

    def once() -> float:
        prompt = fresh()
        first_ms, _ = bench.engine_run([prompt], 1)
        forget()
        full_ms, (done,) = bench.engine_run([prompt], 1 + 64)
        return (full_ms - first_ms) / max(1, len(done.ids) - 1)

    return median_of(rounds, once)
