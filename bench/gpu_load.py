"""The GPU benchmarks' measures under concurrent load (`bench/gpu_common.py` runs them among the others): tokens/s
and first tokens with many clients at once, where the engine's time went while they ran, and a load with one of the
engine's settings off and on, in the order off, on, on, off (`compared`)."""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from bench.gpu_alone import engine_decode, engine_first_token

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from bench.gpu_common import Paths, Row


Run = tuple[float, float, str]
"""One of the engine's loads: its tokens/s, its median first token in ms, and where its time went."""


def engine_loads(
    bench: Paths, clients: tuple[int, ...], fresh: Callable[[], Any], answer: int, rounds: int
) -> dict[int, list[Run]]:
    """The engine under each count of concurrent clients: `rounds` loads, each on new images (a prompt from `fresh` a
    client), every prompt submitted at once."""
    return {count: [engine_load(bench, [fresh() for _ in range(count)], answer) for _ in range(max(1, rounds))]
            for count in clients}  # fmt: skip


def engine_load(bench: Paths, prompts: list[Any], answer: int) -> Run:
    """One load: `prompts` submitted at once, `answer` tokens each. Where its time went, from the first submit to the
    last answer (`StepTimes.load`): the engine's steps that prefilled, those that only decoded, its waits for work
    and the recurring attention calls' plans it built between them (`StepTimes`), and all the time no step ran (those
    waits and plans included, and whatever else kept the engine's thread from a step)."""
    bench.engine.batch_sizes.clear()
    with StepTimes(bench.engine) as steps, Allocator() as allocator:
        engine_ms, done = steps.load(bench, prompts, answer)
    written = sum(len(c.ids) for c in done)
    firsts = sorted(c.first_token_ms for c in done)
    detail = (
        f"engine wrote {written} tokens in {engine_ms:.0f} ms, worst first token {firsts[-1]:.0f} ms, mean "
        f"decode batch {statistics.fmean(bench.engine.batch_sizes):.1f}; {steps}, no step running "
        f"{max(0.0, engine_ms - steps.total()):.0f} ms{allocator}"
    )
    return written / engine_ms * 1000, statistics.median(firsts), detail


def load_rows(
    bench: Paths, fresh: Callable[[], Any], answer: int, runs: dict[int, list[Run]]
) -> tuple[list[Row], list[str]]:
    """Plain `generate` under each load the engine ran (`engine_loads`), as one batched call over as many new prompts
    (`bench.together`): tokens/s and the first token under that load beside the engine's (the medians over its loads),
    and for each client count a note with every engine load's tokens/s and where the median load's time went."""
    rows: list[Row] = []
    notes: list[str] = []
    for count, loads in runs.items():
        together = bench.together([fresh() for _ in range(count)])
        plain_ms, plain_out = bench.plain(together, answer)
        plain_first_ms, _ = bench.plain(together, 1)
        plain_tokens_s = plain_out.numel() / plain_ms * 1000
        rows += [
            (f"{count} concurrent, tokens/s", plain_tokens_s, statistics.median(t for t, _, _ in loads)),
            (f"{count} concurrent, first token ms (p50)", plain_first_ms, statistics.median(f for _, f, _ in loads)),
        ]
        each = ", ".join(f"{tokens:.1f}" for tokens, _, _ in loads)
        notes.append(
            f"{count} concurrent: the engine's {len(loads)} load{'s' if len(loads) > 1 else ''} {each} tokens/s; "
            f"{middle_load(loads)}; plain wrote {plain_out.numel()} in {plain_ms:.0f} ms"
        )
    return rows, notes


def middle_load(runs: list[Run]) -> str:
    """Where the middle load by tokens/s spent its time (each run: tokens/s, first token, detail). With an even
    count the row is the mean of the two middle loads, and the detail is the upper one's, said so."""
    ranked = sorted(runs)
    detail = ranked[len(ranked) // 2][2]
    return f"the median's {detail}" if len(ranked) % 2 else f"the upper of the two middle loads' {detail}"


class StepTimes:
    """Where a load's time went on the engine's thread, timed while the context is open and kept to the load's own
    window (`within`): the wall time of its steps that prefilled a request and of those that only decoded (around
    `engine.step`, which the engine's thread calls on the instance), and between steps, its waits for work (the
    engine's wake event, which a submitted request sets) and the plans it built for recurring attention calls
    (`RecurringCalls.build_one`, run only once it has idled). A step that prefilled waits for the request's first
    token, so its time holds the prefill and the decode step launched before it."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.prefilling: list[Timed] = []
        """Each step that prefilled, with how many rows were decoding when it began (the rows riding, with
        ride-along) as its `rows`."""
        self.decoding: list[Timed] = []
        self.waits: list[Timed] = []
        self.plans: list[Timed] = []
        self._open = False
        self._hooked: list[tuple[Any, str]] = []

    def __enter__(self) -> StepTimes:
        engine, self._open = self.engine, True
        engine_step = engine.step

        def step() -> bool:
            stats = engine.stats()
            with self._timing() as timed:
                worked: bool = engine_step()
            if worked and engine.stats().admitted > stats.admitted:
                self._record(self.prefilling, timed, stats.running)
            elif worked:
                self._record(self.decoding, timed)
            return worked

        self._hook(engine, "step", step)
        recurring = getattr(engine, "recurring", None)
        if recurring is not None:  # a call that found no plan waiting built nothing
            self._hook(recurring, "build_one", self._timed(recurring.build_one, self.plans, kept=bool))
        wake = getattr(engine, "_wake", None)
        if wake is not None:
            self._hook(wake, "wait", self._timed(wake.wait, self.waits))
        return self

    def __exit__(self, *_: object) -> None:
        self._open = False
        for owner, name in self._hooked:
            delattr(owner, name)  # the class's own again
        self._hooked.clear()

    def _hook(self, owner: Any, name: str, timed: Callable[..., bool]) -> None:
        setattr(owner, name, timed)
        self._hooked.append((owner, name))

    def _timed(
        self, call: Callable[..., bool], into: list[Timed], *, kept: Callable[[bool], bool] = lambda _: True
    ) -> Callable[..., bool]:
        """`call` timed, each call recorded `into` where `kept` says of its result."""

        def timed(*args: Any) -> bool:
            with self._timing() as spent:
                result = call(*args)
            if kept(result):
                self._record(into, spent)
            return result

        return timed

    @staticmethod
    @contextlib.contextmanager
    def _timing() -> Iterator[list[float]]:
        timed = [time.perf_counter()]
        yield timed
        timed.append(time.perf_counter())

    def _record(self, into: list[Timed], timed: list[float], rows: int = 0) -> None:
        if self._open:  # not a call that began in the window and ended after the context closed
            into.append(Timed(timed[0], (timed[1] - timed[0]) * 1000, rows))

    def load(self, bench: Paths, prompts: list[Any], answer: int) -> tuple[float, list[Any]]:
        """`bench.engine_run` of `prompts` (its milliseconds and completions), what is timed then kept to its own
        window (`within`)."""
        engine_ms, done = bench.engine_run(prompts, answer)
        until = time.perf_counter()
        self.within(until - engine_ms / 1000, until)
        return engine_ms, done

    def within(self, since: float, until: float) -> StepTimes:
        """Keep only what began between `since` and `until` (`time.perf_counter` seconds: the load's own window,
        not the engine's work or waits before its first request was submitted or after its last was done)."""
        for kept in (self.prefilling, self.decoding, self.waits, self.plans):
            kept[:] = [timed for timed in kept if since <= timed.started <= until]
        return self

    def total(self) -> float:
        """The milliseconds of every step timed, prefilling or decoding."""
        return sum(timed.ms for timed in (*self.prefilling, *self.decoding))

    def by_rows(self) -> str:
        """Each step that prefilled, in order: the rows decoding as it began, then its milliseconds."""
        return " ".join(f"{timed.rows}:{timed.ms:.0f}" for timed in self.prefilling)

    def __str__(self) -> str:
        steps = ", ".join(
            f"{len(times)} steps {what} {sum(times):.0f} ms ({statistics.fmean(times) if times else 0:.1f} each, "
            f"the shortest {min(times, default=0):.1f}, the longest {max(times, default=0):.1f})"
            for what, times in (("with a prefill", _ms(self.prefilling)), ("decoding only", _ms(self.decoding)))
        )
        between = (("wait", "for work", _ms(self.waits)), ("attention plan", "built", _ms(self.plans)))
        return steps + "".join(
            f", {len(times)} {what}{'s' if len(times) > 1 else ''} {done} between them {sum(times):.0f} ms"
            for what, done, times in between
            if times
        )


class Timed(NamedTuple):
    """One call timed on the engine's thread: when it began (`time.perf_counter` seconds), its milliseconds, and for
    a step that prefilled the rows decoding as it began."""

    started: float
    ms: float
    rows: int = 0


def _ms(timed: list[Timed]) -> list[float]:
    return [one.ms for one in timed]


class Allocator:
    """What torch's CUDA memory allocator did while the context was open, when it did anything costly: how often an
    allocation failed and the allocator freed its cached blocks to retry, and how many blocks it gave back to the
    device (each such free waits for the device). Empty on the CPU, or when it did none of that."""

    COUNTERS = ("num_alloc_retries", "num_device_free")

    def __enter__(self) -> Allocator:
        self.before = self._counts()
        self.reserved = self._reserved()
        return self

    def __exit__(self, *_: object) -> None:
        self.after = self._counts()

    @staticmethod
    def _counts() -> dict[str, int]:
        import torch

        if not torch.cuda.is_available():
            return {}
        stats = torch.cuda.memory_stats()
        return {name: int(stats.get(name, 0)) for name in Allocator.COUNTERS}

    @staticmethod
    def _reserved() -> float:
        import torch

        return torch.cuda.memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0

    def __str__(self) -> str:
        done = {name: self.after[name] - self.before[name] for name in self.before}
        if not any(done.values()):
            return ""
        return (
            f", the allocator (holding {self.reserved:.1f} GiB before): {done['num_alloc_retries']} retries after a "
            f"failed allocation, {done['num_device_free']} device frees"
        )


COMPARED = {
    "overlap": "its step overlap",
    "ride_along": "decoding rows riding along in prefills",
    "recurring_plans": "plans of their own for recurring attention calls",
    "prefill_graphs": "prefills padded and replayed as CUDA graphs",
}
"""The engine's settings a benchmark may compare off and on (`compared`), and what each is."""

HELD_BY_STEPS = {"prefill_graphs": "padded"}
"""The settings the engine's steps read once, at start, into an attribute of their own (`DeviceSteps.padded`):
`compared` turns that attribute too."""


def compared(
    bench: Paths,
    setting: str,
    rounds: int,
    fresh: Callable[[], Any],
    forget: Callable[[], None],
    clients: int,
    answer: int,
) -> str:
    """The engine with its `setting` (a boolean `EngineSettings` field) off and on, in the same run, in the order off,
    on, on, off (a machine that drifts within the run weighs on both sides alike): each time the first token of one
    request alone and decode at batch 1 (p50s), and `clients` concurrent clients' tokens/s (the engine alone), with
    where that load's time went (`StepTimes`); then each side's means."""
    from dataclasses import replace

    kept, figures, steps_attribute = bench.engine.settings, [], HELD_BY_STEPS.get(setting)
    held = getattr(bench.engine.device, steps_attribute) if steps_attribute else None
    if steps_attribute and not held:  # the steps sized what it needs at start (the padded prefills' buffers, graphs)
        raise ValueError(f"{setting} can be compared only on an engine started with it on")
    means: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    try:
        for on in (False, True, True, False):
            bench.engine.settings = replace(kept, **{setting: on})
            if steps_attribute:
                setattr(bench.engine.device, steps_attribute, on)
            first = engine_first_token(bench, rounds, fresh)
            decode = engine_decode(bench, rounds, fresh, forget)
            with StepTimes(bench.engine) as steps:
                ms, done = steps.load(bench, [fresh() for _ in range(clients)], answer)
            tokens = sum(len(completion.ids) for completion in done) / ms * 1000
            means[on].append((first, tokens))
            figures.append(
                f"{'on' if on else 'off'}: first token {first:.1f} ms, {decode:.2f} ms/token, {tokens:.1f} tokens/s "
                f"({steps}; the steps that prefilled, rows decoding:ms, {steps.by_rows()})"
            )
    finally:
        bench.engine.settings = kept
        if steps_attribute:
            setattr(bench.engine.device, steps_attribute, held)
    figures += [
        f"mean {'on' if on else 'off'}: first token {statistics.fmean(f for f, _ in runs):.1f} ms, "
        f"{statistics.fmean(t for _, t in runs):.1f} tokens/s"
        for on, runs in means.items()
    ]
    return f"{COMPARED[setting]} (one request; {clients} concurrent, engine alone; off, on, on, off): " + "; ".join(
        figures
    )
