"""The GPU benchmarks' code (`bench/gpu_vision.py`, `bench/gpu_common.py`, `bench/gpu_alone.py`, `bench/gpu_load.py`,
`bench/gpu_parts.py`) run on the CPU over the tiny GLM-4.6V model: their scenarios, their order, and what they print
(`--tiny` proves the code path; it measures nothing)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from bench.gpu_alone import ONE_REQUEST_ROWS, sm_clock
from bench.gpu_load import StepTimes, middle_load
from tests.vision_engine import engine, prompt, submit
from vision_stage.glm_engine import GlmEngine


def test_the_gpu_benchmark_runs_its_scenarios_on_the_cpu() -> None:
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, str(root / "bench" / "gpu_vision.py"), "--tiny", "--rounds", "2", "--clients", "2,3"]
    command.append("--compare-recurring-plans")
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=root, check=False)
    assert finished.returncode == 0, finished.stderr[-2000:]
    # the setting compared off, on, on, off, then each side's means
    run = r"first token [\d.]+ ms, [\d.]+ ms/token, [\d.]+ tokens/s \([^)]*\)[^;]*; the steps that prefilled[^;]*"
    runs = "; ".join(f"{side}: {run}" for side in ("off", "on", "on", "off"))
    means = "; ".join(f"mean {side}: first token [\\d.]+ ms, [\\d.]+ tokens/s" for side in ("off", "on"))
    assert re.search(rf"recurring attention calls \(one request; 3 concurrent[^)]*\): {runs}; {means}", finished.stdout)
    assert "first 32 tokens equal to plain generate: yes" in finished.stdout
    # each lone first token the p50 of three samples a round (two rounds), the engine's listed in the order taken
    six = " ".join([r"[\d.]+"] * 6)
    assert re.search(
        rf"the engine's lone first tokens, ms, in the order taken: {six}; at a new length {six}\n", finished.stdout
    )
    assert "SM clock" not in finished.stdout  # read on a GPU only
    # the host's own pace, before and after the measures, to tell a slow host from a slow engine
    assert re.search(
        r"the host's pace: a one-element add launched in [\d.]+ µs before the measures, [\d.]+ after", finished.stdout
    )
    assert re.search(
        rf"of which waiting to be admitted \(submit → admitted\), ms: {six}; at a new length {six}\n", finished.stdout
    )
    # a load a round for the engine, on new images each; the rows are their medians (of two: the mean), the detail
    # the upper load's
    for count in (2, 3):
        assert re.search(
            rf"{count} concurrent: the engine's 2 loads [\d.]+, [\d.]+ tokens/s; the upper of the two middle loads' "
            "engine wrote",
            finished.stdout,
        )
    # the measures with the heap frozen, as the service runs, and the collections meanwhile counted
    collections = ".*".join(rf"generation {n}: \d+" for n in range(3))
    assert re.search(
        r"garbage collector: a full collection over the heap as loaded \(\d+ objects\) [\d.]+ ms \(p50 of 3\), "
        rf"frozen [\d.]+; the measures ran with the heap frozen, and Python collected meanwhile: {collections}",
        finished.stdout,
    ), finished.stdout
    for measure in (*ONE_REQUEST_ROWS, "3 concurrent, tokens/s", "follow-up"):
        assert f"| {measure}" in finished.stdout
    # distinct images, one image prefill a step: three clients' load has three steps that prefilled
    assert re.search(
        r"3 concurrent: [^\n]*; 3 steps with a prefill \d+ ms \([\d.]+ each, the shortest [\d.]+, the longest [\d.]+\),"
        r" \d+ steps decoding only \d+ ms \([^)]*\)[^;]*, no step running \d+ ms",
        finished.stdout,
    ), finished.stdout


def test_the_gpu_benchmark_measures_the_engine_before_plain_generate_runs_in_its_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Plain `generate`'s prefills may slow the engine's next ones (seen on an H100), where a service runs the engine
    alone: every measure of the engine (a setting compared off and on included) comes before plain `generate` first
    runs, and both paths meet the same new lengths."""
    from bench.gpu_vision import build, run

    bench = build(True, 64, 8, slots=2, compile_layers=False)
    calls: list[tuple[str, int]] = []
    engine_run, generate = bench.engine_run, bench.model.generate

    def engine_spy(prompts: list[Any], new_tokens: int) -> Any:
        calls.extend(("engine", int(bench.request(prompt)[0]["input_ids"].shape[1])) for prompt in prompts)
        return engine_run(prompts, new_tokens)

    def plain_spy(**inputs: Any) -> Any:
        calls.extend(("plain", int(ids.shape[0])) for ids in inputs["input_ids"])
        return generate(**inputs)

    monkeypatch.setattr(bench, "engine_run", engine_spy)
    monkeypatch.setattr(bench.model, "generate", plain_spy)
    try:
        rows, _ = run(bench, 1, (2,), ("overlap",))
    finally:
        bench.engine.close()
    paths = [path for path, _ in calls]
    assert "plain" in paths
    assert "engine" not in paths[paths.index("plain") :]
    assert [label for label, _, _ in rows][:3] == list(ONE_REQUEST_ROWS)
    fixed = int(bench.request(bench.prompt(0))[0]["input_ids"].shape[1])
    new = {path: [n for p, n in calls if p == path and n > fixed] for path in ("engine", "plain")}
    assert len(new["engine"]) == 4  # a warm-up and three samples (one round), each longer than any before
    assert new["engine"] == new["plain"] == sorted(set(new["plain"]))  # the same new lengths, in the same order


def test_the_gpu_benchmark_reads_the_sm_clock_only_on_a_gpu_with_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    assert sm_clock("cpu") is None
    monkeypatch.setattr(torch.cuda, "clock_rate", lambda: 1545)
    assert sm_clock("cuda") == 1545
    assert sm_clock("cpu") is None

    def no_nvml() -> int:
        raise ModuleNotFoundError("No module named 'pynvml'")

    monkeypatch.setattr(torch.cuda, "clock_rate", no_nvml)
    assert sm_clock("cuda") is None


def test_the_gpu_benchmark_details_the_median_load_or_names_the_upper_middle_one() -> None:
    odd = [(900.0, 0.0, "load a"), (1000.0, 0.0, "load b"), (950.0, 0.0, "load c")]
    assert middle_load(odd) == "the median's load c"
    even = [(900.0, 0.0, "load a"), (1000.0, 0.0, "load b"), (950.0, 0.0, "load c"), (980.0, 0.0, "load d")]
    assert middle_load(even) == "the upper of the two middle loads' load d"
    assert middle_load(odd[:1]) == "the median's load a"


def test_a_load_s_detail_counts_the_engine_s_waits_and_plan_builds_between_its_steps() -> None:
    """Between steps the engine's thread waits for work or builds a recurring call's attention plan (once idle): a
    load says how often and how long, beside its steps' times; a build attempted with nothing to build counts nothing,
    and every hook is undone."""

    class Recurring:
        def __init__(self) -> None:
            self.waiting = [True, False]

        def build_one(self) -> bool:
            return self.waiting.pop(0)

    class Engine:
        def __init__(self) -> None:
            self.recurring = Recurring()
            self._wake = threading.Event()

        def step(self) -> bool:
            return False

        def stats(self) -> Any:
            return SimpleNamespace(admitted=0, running=0)

    engine = Engine()
    with StepTimes(engine) as steps:
        assert engine.recurring.build_one()
        assert not engine.recurring.build_one()
        engine.step()
        assert not engine._wake.wait(0.001)
        inside = time.perf_counter()
    assert len(steps.plans) == 1
    assert len(steps.waits) == 1
    assert re.search(
        r", 1 wait for work between them \d+ ms, 1 attention plan built between them \d+ ms$", str(steps)
    ), str(steps)
    assert "build_one" not in vars(engine.recurring)
    assert "step" not in vars(engine)
    assert "wait" not in vars(engine._wake)
    without = StepTimes(Engine())
    assert "attention plan" not in str(without)
    assert "wait" not in str(without)
    # what began before the load's window (its requests prepared, the engine idling) is left out
    assert not steps.within(inside, time.perf_counter()).waits
    assert not steps.plans


def test_a_load_s_detail_times_the_real_engine_s_waits_for_work(glm: GlmEngine) -> None:
    """The hooks reach what the engine's thread calls: an idle engine waits for work, a request makes it step."""
    batch = engine(glm)
    batch.start()
    try:
        with StepTimes(batch) as steps:
            time.sleep(0.12)  # idle: the engine's thread waits 0.05 s at a time
            submit(batch, prompt(glm, 1), "sha-1", budget=2).result(timeout=60)
        assert len(steps.waits) >= 2
        assert len(steps.prefilling) == 1
        assert steps.decoding
        assert "step" not in vars(batch)
        assert "wait" not in vars(batch._wake)
    finally:
        batch.close()


def test_the_gpu_benchmark_s_replays_only_run_checks_agreement_and_measures_nothing_else() -> None:
    """With `--no-cudnn-attention` too, which the run's description names."""
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, str(root / "bench" / "gpu_vision.py"), "--tiny", "--rounds", "1", "--replays-only"]
    finished = subprocess.run(
        [*command, "--no-cudnn-attention"], capture_output=True, text=True, timeout=600, cwd=root, check=False
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "first 32 tokens equal to plain generate: yes" in finished.stdout
    assert "no graphs captured (not a CUDA device)" in finished.stdout  # on a GPU: the replays' times
    assert "| measure" not in finished.stdout
    assert finished.stdout.rstrip().endswith("; attention without cuDNN"), finished.stdout[-300:]


def test_the_gpu_benchmark_times_the_captured_steps_each_replayed_with_its_inputs_in_bounds(glm: GlmEngine) -> None:
    """`replays` over the graphs a GPU engine captures (stand-ins here: the CPU captures none), prefill graphs among
    them: each timed graph's one-row inputs are zeroed first (a padded prefill leaves its last index past an extend
    step's tokens), and the prefill graphs' lengths are not taken for a decode step's span."""
    from bench.gpu_common import replays

    batch = engine(glm, prefill_graphs=True)
    device = batch.device
    replayed: list[tuple[Any, ...]] = []

    class Graph:
        def __init__(self, key: tuple[Any, ...]) -> None:
            self.key = key

        def replay(self) -> None:
            assert (int(device._row), int(device._extend_start), int(device._last)) == (0, 0, 0)
            replayed.append(self.key)

    keys = [(1, 256), (8, 256), ("extend", 32, 256), ("prefill", 128), ("prefill", 256)]
    device.graphs = {key: Graph(key) for key in keys}
    device._last.fill_(255)  # as a padded prefill of 256 tokens leaves it
    timed = replays(batch, lambda: None)
    assert set(replayed) == {(1, 256), (8, 256), ("extend", 32, 256)}
    assert timed.startswith("graph replay alone, ms per step: (1, 256): ")
    assert "('extend', 32, 256): " in timed


def test_where_the_gpu_benchmark_s_paths_part_it_gives_plain_generate_s_scores_there() -> None:
    """Where the paths part, the benchmark's note reads plain `generate`'s scores there (`batch_engine.start.parting`,
    with the prompt's image and the benchmark's suppressed tokens): an engine token that plain chose one place before
    is not plain's best at this place, where a misread place would rank it first."""
    import torch

    from batch_engine.start import FLOOR_STEP, parting
    from bench.gpu_common import checked_agreement, plain_tokens
    from bench.gpu_vision import build

    bench = build(True, 64, 16, slots=4, compile_layers=False)
    try:
        one = bench.prompt(0)
        assert checked_agreement(bench, one) == ["first 32 tokens equal to plain generate: yes"]
        plain = plain_tokens(bench, one)
        change = next(n for n in range(1, len(plain)) if plain[n] != plain[n - 1])
        engine = [*plain[:change], plain[change - 1], *plain[change + 1 :]]
        inputs = bench.generate_inputs(one)
        where = parting(bench.model, inputs, plain, engine)
        assert where is not None
        assert (where.at, where.rank > 0, where.best > where.chosen) == (change, True, True)
        assert where.step == max(torch.finfo(bench.model.dtype).eps, FLOOR_STEP)
        assert checked_agreement(bench, one, engine)[1] == str(where)
        assert str(where).startswith(f"they part at token {change}, where plain generate's best score is ")
        with torch.inference_mode():
            scored = bench.model.generate(
                **inputs, max_new_tokens=change + 1, do_sample=False, output_scores=True, return_dict_in_generate=True
            )
        second = int(torch.topk(scored.scores[change][0], 2).indices[1])
        ranked = parting(bench.model, inputs, plain, [*plain[:change], second])
        assert ranked is not None
        assert ranked.rank == 1, "one token scored above plain's second best"
        assert parting(bench.model, inputs, [plain[0] + 1, *plain[1:]], plain) is None, "plain did not repeat those"
    finally:
        bench.engine.close()


def test_the_parts_benchmark_runs_on_the_cpu() -> None:
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, str(root / "bench" / "gpu_parts.py"), "--tiny", "--rounds", "1"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=root, check=False)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "| vision encoder, 64×64 image, ms: compiled under sdpa (the engine before) |" in finished.stdout
    assert "| vision encoder, 64×64 image, ms: packed attention, compiled, heads symbolic (the engine before) |" in (
        finished.stdout
    )
    encoder = "| vision encoder, 64×64 image, ms: "
    assert f"{encoder}packed attention, compiled, the model's ints constant |" in finished.stdout
    assert f"{encoder}… and its whole-kernel convolutions as products (the engine) |" in finished.stdout
    assert "| q/k/v projections, 2 layers, batch 32, ms |" in finished.stdout
    assert "| image processor, 64×64 image, ms: on the CPU, then on cpu |" in finished.stdout
    assert "text prefill, one decoder layer's code ×40 over" in finished.stdout
    assert "with automatic dynamic shapes" in finished.stdout
    difference = float(finished.stdout.split("between the engine's output and transformers' ")[1].split()[0])
    assert difference < 1e-5, "the engine's encoder computes what transformers' does"
