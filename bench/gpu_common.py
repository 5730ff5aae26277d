"""What the two GPU benchmarks share (`bench/gpu_vision.py`, `bench/gpu_text.py`; their common options are in
`bench/gpu_options.py`, their measures of one request alone in `bench/gpu_alone.py` and under concurrent load in
`bench/gpu_load.py`): the agreement check with plain
`generate`, the scenarios, the graph replays, the decode-step profile and the printed report. Each benchmark's own
`Bench` builds the model and its prompts and runs the two paths."""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from batch_engine.attention_plans import by_power_of_two
from batch_engine.host import launch_pace
from batch_engine.settings import EngineSettings
from batch_engine.start import parted_at, parting
from bench.gc_pauses import Collections, as_loaded_and_frozen
from bench.gpu_alone import Prompts, engine_alone, median_of, one_request, pace_note
from bench.gpu_load import compared, engine_loads, load_rows

Row = tuple[str, float, float]
"""A measure's label, plain `generate`'s figure and the engine's."""


@dataclass
class Paths:
    """The two paths over one model, as each benchmark runs them; each benchmark's own subclass builds its prompts
    (`prompt`, `request`, `together`) and plain `generate`'s inputs (`generate_inputs`)."""

    model: Any
    engine: Any
    device: str

    def sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def plain(self, inputs: Any, new_tokens: int) -> tuple[float, Any]:
        """Plain `generate` on `inputs`, greedy and eager (not the layers the engine compiled): its milliseconds
        and the tokens it wrote."""
        import torch

        on_device = self.generate_inputs(inputs)
        prompt_length = on_device["input_ids"].shape[1]
        self.sync()
        started = time.perf_counter()
        with torch.inference_mode(), torch.compiler.set_stance("force_eager"):
            output = self.model.generate(**on_device, max_new_tokens=new_tokens, do_sample=False)
        self.sync()
        return (time.perf_counter() - started) * 1000, output[:, prompt_length:]

    def generate_inputs(self, inputs: Any) -> dict[str, Any]:
        """`generate`'s keyword arguments for `inputs`, on the model's device."""
        raise NotImplementedError

    def request(self, prompt: Any) -> tuple[dict[str, Any], str | None]:
        """What the engine is given for `prompt`: its inputs, and the key of its image (None without one)."""
        raise NotImplementedError

    def together(self, prompts: list[Any]) -> Any:
        """Equal-length prompts as one batch for plain `generate`."""
        raise NotImplementedError

    def engine_run(self, prompts: list[Any], new_tokens: int) -> tuple[float, list[Any]]:
        """Submit every prompt at once; the milliseconds until all are done, and their completions."""
        requests = [self.request(prompt) for prompt in prompts]
        started = time.perf_counter()
        futures = [self.engine.submit(inputs, image_key=key, max_new_tokens=new_tokens) for inputs, key in requests]
        completions = [future.result(timeout=600) for future in futures]
        return (time.perf_counter() - started) * 1000, completions


B = TypeVar("B", bound=Paths)


def agreement(plain: list[int], engine: list[int], *, label: str = "first 32 tokens equal to plain generate") -> str:
    parted = parted_at(plain, engine)
    return f"{label}: {'yes' if parted is None else f'no, they part at {parted}'}"


def checked_agreement(bench: Paths, one: Any, engine_ids: list[int] | None = None) -> list[str]:
    """Whether the engine's first 32 tokens on `one` (`engine_ids`, where the engine ran them before; else run here,
    first) equal plain `generate`'s, and, where they part, plain's scores there and whether at a near-tie
    (`batch_engine.start.parting`, as the backends' check at load says it)."""
    if engine_ids is None:
        engine_ids = engine_tokens(bench, one)
    plain = plain_tokens(bench, one)
    notes = [agreement(plain, engine_ids)]
    if parted_at(plain, engine_ids) is not None:
        where = parting(bench.model, bench.generate_inputs(one), plain, engine_ids)
        notes.append(str(where) if where else "where they part, plain generate did not repeat its tokens")
    return notes


def start_engine(
    bench: Paths,
    max_tokens: int,
    warm: Any,
    *,
    slots: int,
    compile_layers: bool,
    decode_kernel: bool | None = EngineSettings.decode_kernel,
    fuse_projections: bool = EngineSettings.fuse_projections,
    compile_shapes: str = EngineSettings.compile_shapes,
    linear_kernel: bool | None = EngineSettings.linear_kernel,
    ride_along: bool = EngineSettings.ride_along,
    recurring_plans: bool = EngineSettings.recurring_plans,
    dependent_launch: bool | None = EngineSettings.dependent_launch,
    prefill_graphs: bool | None = EngineSettings.prefill_graphs,
) -> None:
    """The engine over `bench.model` with the benchmarks' settings (the engine's defaults where not given; no loop
    stop: every answer runs to its budget),
    started; with compiled layers, the prompt `warm` compiles the rest outside the timing (the engine's start has
    already compiled its text prefills, `batch_engine.compiling.warm_prefills`, as a service's does; the prompt
    compiles what that leaves, such as an image model's encoder)."""

    from batch_engine.engine import BatchEngine

    settings = EngineSettings(
        slots=slots,
        max_tokens=max_tokens,
        queue_size=4 * slots,
        compile=compile_layers,
        stop_loops=False,
        decode_kernel=decode_kernel,
        fuse_projections=fuse_projections,
        compile_shapes=compile_shapes,
        linear_kernel=linear_kernel,
        ride_along=ride_along,
        recurring_plans=recurring_plans,
        dependent_launch=dependent_launch,
        prefill_graphs=prefill_graphs,
    )
    bench.engine = BatchEngine(bench.model, settings)
    started = time.perf_counter()
    bench.engine.start()
    if compile_layers:
        bench.engine_run([warm], 4)
    graphs = len(bench.engine.device.graphs)
    kernel = "Triton kernel" if bench.engine.device.decode_step.kernel else "grouped products"
    linear = "Triton kernel" if bench.engine.device.linear_kernel else "cuBLAS"
    fused = "fused" if fuse_projections else "apart"
    held = ""
    if bench.device == "cuda":  # the weights, the slots' KV cache, the graphs' pools: what the start left reserved
        import torch

        held = f", {torch.cuda.memory_reserved() / 2**30:.1f} GiB reserved on the device"
    print(
        f"engine started (graphs: {graphs}, decode attention: {kernel}, decode linear layers: {linear}, q/k/v "
        f"projections {fused}, ride-along {'on' if ride_along else 'off'}, dependent launch "
        f"{'on' if bench.engine.device.dependent_launch else 'off'}, prefill graphs "
        f"{'on' if bench.engine.device.padded else 'off'}) in "
        f"{time.perf_counter() - started:.1f} s{held}",
        file=sys.stderr,
    )


@dataclass(frozen=True)
class FollowUp:
    """A benchmark's follow-up question: its row's label, one measured follow-up's first token in ms, and a note on
    what the measured ones reused (read after them)."""

    label: str
    first_token_ms: Callable[[], float]
    note: Callable[[], str]


def scenarios(
    bench: Paths,
    rounds: int,
    prompts: Prompts,
    clients: tuple[int, ...],
    answer: int,
    follow_up: FollowUp,
    compare: tuple[str, ...] = (),
) -> tuple[list[Row], list[str]]:
    """Both benchmarks' measures, the engine's first, then plain `generate`'s. The engine's: its first 32 tokens on
    `Prompts.one`, one request alone (`engine_alone`), each load (`engine_loads`), the follow-up, the graph replays,
    and each setting to `compare` off and on (`compared`). Then plain `generate`'s: the agreement check
    (`checked_agreement`), one request alone, each load, its cold first token the follow-up's baseline (it reuses
    nothing). A service runs the engine alone, so the engine is measured before plain `generate` has run in the
    process: a probe on an H100 once saw plain `generate`'s prefills slow the engine's next ones, others did not, and
    the engine's lone requests were as slow once in a process where plain `generate` never ran (all in
    `bench/RESULTS.md`). (With `recurring_plans`, the engine's thread may still build a plan once it has idled a
    quarter second, while plain `generate`'s first call runs: the untimed agreement tokens come first.)"""
    fresh, forget = prompts.fresh, prompts.forget
    engine_ids = engine_tokens(bench, prompts.one)
    alone = engine_alone(bench, rounds, prompts)
    runs = engine_loads(bench, clients, fresh, answer, rounds)
    follow_up_ms = median_of(rounds, follow_up.first_token_ms)
    engine_notes = [follow_up.note(), replays(bench.engine, bench.sync)]
    engine_notes += [compared(bench, setting, rounds, fresh, forget, max(clients), answer) for setting in compare]
    notes = checked_agreement(bench, prompts.one, engine_ids)
    rows, alone_notes = one_request(bench, rounds, prompts, alone)
    load_table, load_notes = load_rows(bench, fresh, answer, runs)
    rows += [*load_table, (follow_up.label, rows[0][1], follow_up_ms)]
    return rows, [*notes, *alone_notes, *load_notes, *engine_notes]


def engine_tokens(bench: Paths, one: Any) -> list[int]:
    """The engine's first 32 tokens on the prompt `one`."""
    _, (check,) = bench.engine_run([one], 32)
    return list(check.ids)


def plain_tokens(bench: Paths, one: Any) -> list[int]:
    """Plain `generate`'s first 32 tokens on the prompt `one`."""
    _, plain_ids = bench.plain(one, 32)
    return list(plain_ids[0].tolist())


def float32_agreement(bench: Paths, one: Any, max_tokens: int) -> str:
    """Whether the engine and plain `generate` agree on 32 tokens with the model in float32 (bfloat16 rounding
    differs between their attention kernels, which flips near-ties of random weights)."""
    from batch_engine.engine import BatchEngine

    bench.model.float()
    bench.engine = BatchEngine(bench.model, EngineSettings(slots=2, max_tokens=max_tokens))
    bench.engine.start()
    try:
        engine = engine_tokens(bench, one)
        plain = plain_tokens(bench, one)
    finally:
        bench.engine.close()
    return agreement(plain, engine, label="in float32, first 32 tokens equal to plain generate")


def longest_span(engine: Any, graphs: dict[tuple[Any, ...], Any]) -> int:
    """The longest span of the decode and extend graphs captured (the padded prefills' keys hold a length, not a
    span), or the engine's `max_tokens` where none were."""
    spans = [key[-1] for key in graphs if key[0] != "prefill"]
    return max(spans) if spans else int(engine.settings.max_tokens)


def replays(engine: Any, sync: Callable[[], None]) -> str:
    """How long the captured graphs take on the device alone (the engine idle), against the steps as served."""

    graphs = engine.device.graphs
    if not graphs:
        return "no graphs captured (not a CUDA device)"
    span = longest_span(engine, graphs)
    timed = []
    for key in ((1, span), (8, span), (32, span), ("extend", 32, span)):
        graph = graphs.get(key)
        if graph is None:
            continue
        engine.device.clear_row_inputs()  # an extend graph reads its last token at an index another step may leave out
        graph.replay()
        sync()
        started = time.perf_counter()
        for _ in range(20):
            graph.replay()
        sync()
        timed.append(f"{key}: {(time.perf_counter() - started) * 1000 / 20:.2f} ms")
    return "graph replay alone, ms per step: " + ", ".join(timed)


def profile(engine: Any, device: str, sync: Callable[[], None]) -> None:
    """The kernels of ten eager decode steps at batch 1 and 32 (compiled layers, no graph), by device time."""
    import torch
    from torch.profiler import ProfilerActivity

    span = longest_span(engine, engine.device.graphs)
    activities = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    for batch in sorted({1, min(32, engine.settings.slots)}):
        with torch.inference_mode():
            engine.device._decode_step(batch, span)
            sync()
            with torch.profiler.profile(activities=activities) as profiler:
                for _ in range(10):
                    engine.device._decode_step(batch, span)
                sync()
        print(f"decode step, batch {batch}, span {span}, 10 steps:", file=sys.stderr)
        print(profiler.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=90),
              file=sys.stderr)  # fmt: skip


def drive(
    args: argparse.Namespace,
    build: Callable[[], B],
    run: Callable[[B], tuple[list[Row], list[str]]],
    describe: Callable[[B], str],
    *,
    check: Callable[[B], tuple[Any, int]],
    more_profiles: Callable[[B], None] | None = None,
) -> None:
    """Build the two paths (timed), run the measures (`--replays-only`: only the first tokens' agreement and the graph
    replays, the steady measure of a change to the step), the profiles (`--profile`) and the float32 check
    (`--check-float32`: `check` gives the prompt and a slot's length), close the engine, and print the report. The
    measures run with the heap frozen as the service freezes it once its models are loaded (`--heap as-loaded`: not),
    the garbage collector's collections during them counted (`bench.gc_pauses`)."""

    from batch_engine.compiling import recompile_limit_hits, watch_recompile_limit

    watch_recompile_limit()
    hits_before = recompile_limit_hits()
    started = time.perf_counter()
    bench = build()
    print(f"built in {time.perf_counter() - started:.1f} s: {describe(bench)}", file=sys.stderr)
    (loaded, loaded_ms), (_, frozen_ms) = as_loaded_and_frozen(3)  # leaves the heap frozen
    if args.heap == "as-loaded":
        gc.unfreeze()
    heap = "frozen" if gc.get_freeze_count() else "as loaded"
    paced = launch_pace(bench.device)
    rows: list[Row]
    try:
        with Collections() as collections:
            if args.replays_only:  # the engine's first, as in `scenarios`
                one = check(bench)[0]
                engine_ids, replayed = engine_tokens(bench, one), replays(bench.engine, bench.sync)
                rows, notes = [], [*checked_agreement(bench, one, engine_ids), replayed]
            else:
                rows, notes = run(bench)
        if args.profile:
            profile(bench.engine, bench.device, bench.sync)
            if more_profiles is not None:
                more_profiles(bench)
    finally:
        bench.engine.close()
        gc.unfreeze()
    notes.append(pace_note(paced, bench.device, "measures"))
    notes.append(
        f"garbage collector: a full collection over the heap as loaded ({loaded} objects) {loaded_ms:.1f} ms (p50 of "
        f"3), frozen {frozen_ms:.2f}; the measures ran with the heap {heap}, and Python collected meanwhile: "
        + collections.summary()
    )
    summary = describe(bench)
    if args.check_float32:
        one, max_tokens = check(bench)
        notes.append(float32_agreement(bench, one, max_tokens))
    hits = recompile_limit_hits() - hits_before
    notes.append(f"dynamo's recompile limit hit {hits} times (0: every compiled part ran compiled)")
    if (graphs := getattr(bench.engine.device, "encoder_graphs", None)) is not None:
        notes.append(graphs.summary())
    if bench.device == "cuda":
        import torch

        notes.append(
            f"memory reserved on the device after the measures {torch.cuda.memory_reserved() / 2**30:.1f} GiB, at "
            f"most {torch.cuda.max_memory_reserved() / 2**30:.1f} (plain `generate`'s included)"
        )
    report(rows, notes, summary)


def what_ran(bench: Paths, prompt: str) -> str:
    """The model (its class, size and dtype), the device, the software, the prompt (`prompt` says it), the engine."""
    import torch
    import transformers

    parameters = sum(p.numel() for p in bench.model.parameters()) / 1e9
    gpu = torch.cuda.get_device_name() if bench.device == "cuda" else "CPU"
    settings = bench.engine.settings
    cudnn_attention = torch.backends.cuda.cudnn_sdp_enabled()  # type: ignore[no-untyped-call]
    return (
        f"{type(bench.model).__name__}, {parameters:.2f} B parameters, {bench.model.dtype}, on {gpu}; torch "
        f"{torch.__version__}, transformers {transformers.__version__}; prompt {prompt}; engine {settings.slots} "
        f"slots of {settings.max_tokens} tokens, {len(bench.engine.device.graphs)} graphs"
        + ("" if cudnn_attention else "; attention without cuDNN")
        + (
            "; cuDNN's attention planned per power of two of the lengths"
            + (", recurring calls given plans of their own" if settings.recurring_plans else "")
            if bench.device == "cuda" and by_power_of_two()
            else ""
        )
    )


def report(rows: list[Row], notes: list[str], summary: str) -> None:
    """One markdown table with the engine's speed-up per measure (none without measures), then the notes and what
    ran."""
    if rows:
        print("| measure | plain `model.generate` | batching engine | engine's speed-up |")
        print("| --- | ---: | ---: | ---: |")
        for label, plain, ours in rows:
            ratio = ours / plain if "tokens/s" in label else plain / ours
            print(f"| {label} | {plain:.1f} | {ours:.1f} | {ratio:.2f}× |")
        print()
    print(*(f"- {note}" for note in notes), sep="\n")
    print()
    print(summary)
