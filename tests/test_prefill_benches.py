"""The prefill benchmarks on the CPU. `bench/gpu_prefill_waits.py`: its baseline places a prompt's image as the engine
does (the same embeddings, another way), and each side's turns run that side's placement.
`bench/gpu_prefill_graphs.py`: each side's turns run that side's prefill (padded or as before).
`bench/gpu_start_check.py`: each `checked` turn runs the `glm` backend's start check before its first request, each
`idled` turn waits, and no turn has an untimed request. `bench/gpu_encoder_graphs.py`: each side's turns hand the
prefill the engine's encoder graphs or none. The scripts print their table and every turn."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import batch_engine.steps  # noqa: E402
from batch_engine.images import place_images  # noqa: E402
from bench import gpu_encoder_graphs, gpu_prefill_graphs, gpu_prefill_waits, gpu_start_check  # noqa: E402
from bench.gpu_vision import build  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench() -> Any:
    bench = build(True, 64, 16, slots=2, compile_layers=False)
    yield bench
    bench.engine.close()


def test_the_baseline_places_an_image_as_the_engine_does(bench: Any) -> None:
    prompt = bench.engine.prepare(bench.prompt(5), None)
    with torch.inference_mode():
        engine = bench.engine.device.text.embed_tokens(prompt.ids)
        baseline = engine.clone()
        place_images(engine, prompt, bench.model, bench.engine.device.encoder)
        gpu_prefill_waits.before(baseline, prompt, bench.model, None)
    assert torch.equal(engine, baseline)
    assert not torch.equal(engine, bench.engine.device.text.embed_tokens(prompt.ids)), "the image was placed"


def test_each_turn_runs_its_side_s_placement(bench: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def spy(side: str, place: Any) -> Any:
        def placing(*args: Any) -> None:
            calls.append(side)
            place(*args)

        return placing

    monkeypatch.setattr(gpu_prefill_waits, "before", spy("before", gpu_prefill_waits.before))
    monkeypatch.setattr("batch_engine.images.place_images", spy("engine", place_images))
    samples, turns = gpu_prefill_waits.run(bench, 1)
    # each turn: a warm-up and one measured request, in the order before, engine, engine, before
    assert calls == ["before"] * 2 + ["engine"] * 4 + ["before"] * 2
    assert [len(samples[side]) for side in ("before", "engine")] == [2, 2]
    assert [turn.split(":")[0] for turn in turns] == list(gpu_prefill_waits.TURNS)
    assert vars(batch_engine.steps)["place_images"] is place_images, "the engine's placement is back after the run"


def test_each_turn_runs_its_side_s_prefill(monkeypatch: pytest.MonkeyPatch) -> None:
    # its own (the module's would reuse kept prefixes), as the script builds it
    bench = build(True, 64, 16, slots=2, compile_layers=False, prefill_graphs=True)
    device = bench.engine.device
    padded: list[int] = []
    original = device._padded

    def spy(*args: Any) -> int:
        padded.append(args[-1])  # the prompt's tokens
        token: int = original(*args)
        return token

    encoders: list[Any] = []
    monkeypatch.setattr(device, "_padded", spy)
    monkeypatch.setattr(device, "encoder_graphs", "the engine's")  # none on a CPU: a stand-in
    monkeypatch.setattr(batch_engine.steps, "place_images", lambda *args: encoders.append(args[4:]))
    samples, turns = gpu_prefill_graphs.run(bench, 1)
    # two graphs turns of a warm-up and one measured request each; the eager turns prefill as before
    assert len(padded) == 4
    assert [len(samples[side]) for side in ("eager", "graphs")] == [2, 2]
    assert [turn.split(":")[0] for turn in turns] == list(gpu_prefill_graphs.TURNS)
    assert device.padded is True, "the engine's setting is back after the run"
    assert encoders == [(None,)] * 8, "the encoder's graphs set aside on both sides"
    assert device.encoder_graphs == "the engine's", "and back after the run"
    bench.engine.close()


def test_the_prefill_graphs_compared_under_load_pad_only_the_on_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--compare-prefill-graphs`: the engine's steps read the setting once, at start, so the comparison turns their
    own switch too: the `on` runs pad their prefills, the `off` runs prefill as before, and the switch is back after."""
    from bench.gpu_load import compared
    from bench.gpu_options import arguments, engine_options

    options = arguments(None, device_memory="").parse_args(["--tiny", "--compare-prefill-graphs"])
    assert engine_options(options)["prefill_graphs"] is True, "captured at start where compared"
    bench = build(True, 64, 16, slots=2, compile_layers=False, prefill_graphs=True)
    device, seeds = bench.engine.device, iter(range(500, 600))
    padded: list[bool] = []
    original = device._padded

    def spy(*args: Any) -> int:
        padded.append(bench.engine.settings.prefill_graphs)
        token: int = original(*args)
        return token

    monkeypatch.setattr(device, "_padded", spy)
    note = compared(bench, "prefill_graphs", 1, lambda: bench.prompt(next(seeds)), device.prefixes.clear, 2, 4)
    assert all(padded), "only the runs with the setting on padded their prefills"
    # each of the two on runs: lone first tokens, a decode run and a load of two, each on new images
    assert len(padded) >= 2 * 4
    assert note.startswith("prefills padded and replayed as CUDA graphs (one request; 2 concurrent")
    assert device.padded is True, "the steps' switch is back"
    assert bench.engine.settings.prefill_graphs is True, "the engine's setting is back"
    bench.engine.close()
    eager = build(True, 64, 16, slots=2, compile_layers=False, prefill_graphs=False)
    with pytest.raises(ValueError, match="only on an engine started with it on"):
        compared(eager, "prefill_graphs", 1, lambda: eager.prompt(next(seeds)), device.prefixes.clear, 2, 4)
    eager.engine.close()
    command = [sys.executable, str(ROOT / "bench" / "gpu_vision.py"), "--tiny", "--compare-prefill-graphs"]
    refused = subprocess.run(
        [*command, "--prefill-graphs", "off"], capture_output=True, text=True, timeout=120, cwd=ROOT, check=False
    )
    assert refused.returncode == 2
    assert "--compare-prefill-graphs starts the engine with the prefills' graphs captured" in refused.stderr


def test_each_turn_begins_with_its_side_s_check_or_idle_and_no_warm_up(
    bench: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vision_stage.glm_engine import GlmEngine

    events: list[str] = []
    check = GlmEngine.check_batching
    run = bench.engine_run

    def checking(engine: GlmEngine) -> bool:
        events.append("check")
        assert engine.batch is bench.engine, "the check runs the benchmark's engine"
        agreed: bool = check(engine)
        return agreed

    def running(prompts: list[Any], new_tokens: int) -> Any:
        events.append("request")
        return run(prompts, new_tokens)

    monkeypatch.setattr(GlmEngine, "check_batching", checking)
    monkeypatch.setattr(bench, "engine_run", running)
    monkeypatch.setattr("bench.gpu_start_check.time.sleep", lambda seconds: events.append(f"idle {seconds}"))
    samples, turns = gpu_start_check.run(bench, 2)
    # one untimed request after the start, then two timed a turn (none untimed), cold, idled, checked, checked, idled
    idle, two = f"idle {gpu_start_check.IDLE_WAIT}", ["request"] * 2
    assert events == ["request", *two, idle, *two, "check", *two, "check", *two, idle, *two]
    assert [len(samples[side]) for side in ("cold", "idled", "checked")] == [2, 4, 4]
    assert [turn.split(":")[0] for turn in turns] == list(gpu_start_check.TURNS)


def test_each_encoder_turn_hands_the_prefill_its_side_s_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's encoder graphs (a stand-in here: none are captured on a CPU) reach the prefill's placement in the
    `graphs` turns and the two requests before the turns (which meet the grid twice), and not in the `eager` ones; the
    engine's prefills padded, as the script starts it."""
    bench = build(True, 64, 16, slots=2, compile_layers=False, prefill_graphs=True)
    handed: list[Any] = []
    graphs = object()

    def placing(embeds: Any, prompt: Any, model: Any, store: Any, given: Any = None) -> None:
        handed.append(given)
        place_images(embeds, prompt, model, store)

    device = bench.engine.device
    monkeypatch.setattr(device, "encoder_graphs", graphs)
    monkeypatch.setattr(batch_engine.steps, "place_images", placing)
    try:
        samples, _ = gpu_encoder_graphs.run(bench, 1)
    finally:
        bench.engine.close()
    # before the turns two requests; then a warm-up and one measured request a turn: eager, graphs, graphs, eager
    assert handed == [graphs] * 2 + [None] * 2 + [graphs] * 4 + [None] * 2
    assert [len(samples[side]) for side in ("eager", "graphs")] == [2, 2]
    assert device.encoder_graphs is graphs, "the engine's graphs are back after the run"


@pytest.mark.parametrize(
    ("script", "module"),
    [
        ("gpu_prefill_waits.py", gpu_prefill_waits),
        ("gpu_prefill_graphs.py", gpu_prefill_graphs),
        ("gpu_start_check.py", gpu_start_check),
        ("gpu_encoder_graphs.py", gpu_encoder_graphs),
    ],
)
def test_the_script_prints_both_sides_and_every_turn(script: str, module: Any) -> None:
    command = [sys.executable, str(ROOT / "bench" / script), "--tiny", "--rounds", "2"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert finished.returncode == 0, finished.stderr[-2000:]
    number = r"[\d.]+"
    assert re.search(
        rf"\| first token, one request, ms \(p50 of 4\) \| {number} \| {number} \| {number}× \|", finished.stdout
    )
    two = f"{number} {number}"
    turns = "; ".join(f"{side}: {two}" for side in module.TURNS)
    assert re.search(rf"turns in the order taken \({' '.join(module.TURNS)}\), ms: {turns}\n", finished.stdout)
    assert re.search(
        rf"the host's pace: a one-element add launched in {number} µs before the turns, {number} after", finished.stdout
    )


def test_the_comparisons_plan_attention_as_the_service_does(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from batch_engine.attention_plans import by_power_of_two
    from bench.gpu_alone import compare_lone

    planned: list[bool] = []

    def build(*args: Any, **kwargs: Any) -> Any:
        planned.append(by_power_of_two())
        raise SystemExit

    monkeypatch.setattr(os, "environ", {})  # the process's own, untouched
    monkeypatch.setattr("bench.gpu_vision.build", build)
    monkeypatch.setattr(sys, "argv", ["gpu_start_check.py", "--tiny"])
    with pytest.raises(SystemExit):
        compare_lone("", gpu_start_check.TURNS, {}, gpu_start_check.run)
    assert planned == [True], "cuDNN's attention planned per power of two before the engine is built"
