"""The vision encoder replayed per image grid (`batch_engine.encoder_graphs`), on the CPU: a CUDA graph is stood in for
by one that runs the captured call again on the same tensors, as a replay runs its kernels again on the same memory
(its output written into the tensor of its first run). So what is tested is the engine's part: a grid captured at its
second meeting and replayed after, each image's own pixels copied in, each output copied out before the next replay
writes over it, the encoder's output the same as without the graphs, a failed capture left eager, the bound on the
graphs kept, and a prefill using them only while it is padded. That a real CUDA graph gives the same output to the bit
is `tests/gpu/test_glm_gpu.py`'s."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from batch_engine import encoder_graphs  # noqa: E402
from batch_engine.encoder_graphs import FAILURES_TOLERATED, GRIDS_KEPT, EncoderGraphs  # noqa: E402
from batch_engine.engine import BatchEngine  # noqa: E402
from batch_engine.images import encode_images, encoder_inputs  # noqa: E402
from batch_engine.prompts import Prompt  # noqa: E402
from batch_engine.settings import EngineSettings  # noqa: E402
from tests.tiny_glm4v import glm_tokenizer, tiny_glm4v_model  # noqa: E402
from tests.vision_engine import engine, prompt  # noqa: E402
from vision_stage.glm_engine import GlmEngine  # noqa: E402

FEATURES = 3 * 2 * 14 * 14


class Replayed:
    """A captured call as a CUDA graph stands for it: `replay` runs it again."""

    def __init__(self, step: Callable[[], None]) -> None:
        self.step = step

    def replay(self) -> None:
        self.step()


@pytest.fixture
def captures(monkeypatch: pytest.MonkeyPatch) -> list[Callable[[], None]]:
    """The calls captured, each run once outside the "graph" first, as `capture_one` runs it."""
    taken: list[Callable[[], None]] = []

    def capture_one(step: Callable[[], None], pool: Any, *, error_mode: str = "global") -> Replayed:
        assert error_mode == "thread_local", "captured at request time: other threads may use the device"
        step()
        step()
        taken.append(step)
        return Replayed(step)

    monkeypatch.setattr(encoder_graphs, "capture_one", capture_one)
    monkeypatch.setattr(encoder_graphs, "new_pool", object)
    return taken


def encoder_model() -> Any:
    torch.manual_seed(0)
    model = tiny_glm4v_model(glm_tokenizer()).eval()
    BatchEngine(model, EngineSettings(slots=1, max_tokens=512))  # its packed vision attention, as the engine runs it
    return model


def image(grid: tuple[int, int, int], seed: int) -> Prompt:
    """An image prompt of `grid` (frames, rows, columns of patches) with random pixels, kept under no key."""
    patches = grid[0] * grid[1] * grid[2]
    pixels = torch.randn(patches, FEATURES, generator=torch.Generator().manual_seed(seed))
    ids = torch.zeros(patches // 4, dtype=torch.long)
    return Prompt(ids, torch.zeros((3, len(ids)), dtype=torch.long), 0, pixels, torch.tensor([grid]), None)


def test_a_grid_met_twice_is_captured_and_replayed_with_each_image_its_own_output(captures: list[Any]) -> None:
    model = encoder_model()
    graphs = EncoderGraphs(model.model.visual, model.device)
    prompts = [image((1, 8, 12), seed) for seed in range(4)]
    with torch.inference_mode():
        eager = [encode_images(prompt, model, None) for prompt in prompts]
        first = graphs.encode(prompts[0].pixel_values, prompts[0].grid)
        assert first is None, "a grid's first meeting runs eagerly"
        assert not captures
        replayed = [encode_images(prompt, model, None, graphs) for prompt in prompts[1:]]
    assert len(captures) == 1
    assert graphs.replays == 3
    assert list(graphs.captured) == [(1, 8, 12)]
    assert not graphs.met, "a captured grid is no longer counted"
    assert [grid for grid, _, _ in graphs.captures] == [(1, 8, 12)], "the capture recorded, with its time"
    assert graphs.summary().startswith("the vision encoder's CUDA graphs: 1 grid(s) kept, 3 replays, 0 failed")
    assert "captured: 1×8×12 in " in graphs.summary()
    for got, expected in zip(replayed, eager[1:], strict=True):
        assert torch.equal(got, expected), "each image's own pixels in, its own output out, kept past the next replay"


def test_several_images_and_grids_met_once_run_eagerly(captures: list[Any]) -> None:
    model = encoder_model()
    graphs = EncoderGraphs(model.model.visual, model.device)
    two = torch.randn(96 + 24, FEATURES)
    with torch.inference_mode():
        for _ in range(3):
            assert graphs.encode(two, torch.tensor([[1, 8, 12], [1, 6, 4]])) is None
        for rows in (4, 6, 8):
            assert graphs.encode(torch.randn(rows * 4, FEATURES), torch.tensor([[1, rows, 4]])) is None
    assert not captures
    assert not graphs.captured
    assert dict(graphs.met) == {(1, 4, 4): 1, (1, 6, 4): 1, (1, 8, 4): 1}, "several images are not counted"


def refuse_captures(monkeypatch: pytest.MonkeyPatch) -> list[Callable[[], None]]:
    """Every capture from now on fails, as a CUDA capture does on an operation it forbids; returns the calls tried."""
    tries: list[Callable[[], None]] = []

    def refused(step: Callable[[], None], pool: Any, **_: Any) -> None:
        tries.append(step)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(encoder_graphs, "capture_one", refused)
    monkeypatch.setattr(encoder_graphs, "new_pool", object)
    return tries


def test_a_failed_capture_leaves_its_grid_eager_for_good(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = encoder_model()
    graphs = EncoderGraphs(model.model.visual, model.device)
    tries = refuse_captures(monkeypatch)
    prompt = image((1, 4, 4), 0)
    with torch.inference_mode(), caplog.at_level(logging.ERROR, "batch_engine"):
        eager = encode_images(prompt, model, None)
        for _ in range(4):
            assert torch.equal(encode_images(prompt, model, None, graphs), eager)
    assert len(tries) == 1, "tried once, at the second meeting"
    assert graphs.failed == {(1, 4, 4)}
    assert not graphs.captured
    assert graphs.replays == 0
    assert "not captured for grid (1, 4, 4)" in caplog.text


def test_after_failures_tolerated_no_grid_is_captured_those_kept_still_replayed(
    captures: list[Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = encoder_model()
    graphs = EncoderGraphs(model.model.visual, model.device)
    kept = image((1, 8, 8), 1)
    with torch.inference_mode(), caplog.at_level(logging.ERROR, "batch_engine"):
        for _ in range(2):
            graphs.encode(kept.pixel_values, kept.grid)
        assert list(graphs.captured) == [(1, 8, 8)]
        tries = refuse_captures(monkeypatch)
        for rows in range(2, 2 + 2 * FAILURES_TOLERATED, 2):
            prompt = image((1, rows, 4), rows)
            for _ in range(2):
                assert graphs.encode(prompt.pixel_values, prompt.grid) is None
        assert len(tries) == FAILURES_TOLERATED
        assert "captures failed; no grid is captured from now on" in caplog.text
        later = image((1, 20, 4), 0)
        for _ in range(3):
            assert torch.equal(encode_images(later, model, None, graphs), encode_images(later, model, None))
        replays = graphs.replays
        assert torch.equal(encode_images(kept, model, None, graphs), encode_images(kept, model, None))
        assert graphs.replays == replays + 1, "the grid captured before still replays"
    assert len(tries) == FAILURES_TOLERATED, "no grid tried after that"
    assert len(graphs.failed) == FAILURES_TOLERATED
    assert not graphs.met, "nor counted"


def test_at_most_grids_kept_graphs_are_kept_the_least_recently_used_dropped(captures: list[Any]) -> None:
    model = encoder_model()
    graphs = EncoderGraphs(model.model.visual, model.device)
    grids = [(1, 2 * rows, 4) for rows in range(1, GRIDS_KEPT + 2)]

    def meet(grid: tuple[int, int, int], seed: int) -> Any:
        return graphs.encode(image(grid, seed).pixel_values, torch.tensor([grid]))

    with torch.inference_mode():
        for grid in grids[:GRIDS_KEPT]:
            assert meet(grid, 0) is None
            assert meet(grid, 1) is not None
        assert meet(grids[0], 2) is not None, "the first grid used again: now the most recently used"
        assert meet(grids[-1], 0) is None
        assert meet(grids[-1], 1) is not None
    assert len(captures) == GRIDS_KEPT + 1
    assert set(graphs.captured) == {grids[0], *grids[2:]}, "the least recently used, the second grid, dropped"
    assert [grid for grid, _, _ in graphs.captures] == grids[1:], "the last GRIDS_KEPT captures recorded, no more"
    with torch.inference_mode():
        assert meet(grids[1], 3) is None, "a dropped grid is counted anew"


def test_a_graphs_inputs_outlive_its_capture(captures: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA graph holds no reference to the memory its kernels read: the grid's inputs (positions, bounds) are kept
    with it, or the allocator would hand their memory to other tensors while each replay still reads it. The stand-in
    graph's own hold on the captured call, which a real graph does not have, is dropped before looking."""
    import gc
    import weakref

    made: list[Any] = []

    def inputs(grid: Any, visual: Any, device: Any) -> dict[str, Any]:
        given = encoder_inputs(grid, visual, device)
        made.extend(weakref.ref(value) for value in given.values() if isinstance(value, torch.Tensor))
        return given

    monkeypatch.setattr(encoder_graphs, "encoder_inputs", inputs)
    model = encoder_model()
    graphs = EncoderGraphs(model.model.visual, model.device)
    prompt = image((1, 8, 12), 0)
    with torch.inference_mode():
        for _ in range(2):
            graphs.encode(prompt.pixel_values, prompt.grid.clone())
    (held,) = graphs.captured.values()
    held.graph.step = None
    captures.clear()
    gc.collect()
    assert len(made) == 3
    assert all(alive() is not None for alive in made), "every tensor the graph reads is still held"


def test_a_prefill_replays_the_encoders_graph_only_while_padded(glm: GlmEngine, captures: list[Any]) -> None:
    """The engine's prefill of an image prompt, on the CPU (its padded step run eagerly), each on a new image of one
    size: the same first token and the same keys in the slot with the encoder replayed as without (the prefill padded
    both times); with the prefills not padded (`DeviceSteps.padded`), the encoder runs eagerly."""
    batch = engine(glm, prefill_graphs=True)
    steps = batch.device
    assert steps.encoder_graphs is None, "nothing is captured on a CPU"
    model: Any = glm.model
    steps.encoder_graphs = graphs = EncoderGraphs(model.model.visual, steps.device)

    def prefills() -> list[tuple[int, Any]]:
        """Each image's first token and the keys its prompt left in the slot."""
        done = []
        for seed in range(3):
            asked = batch.prepare(prompt(glm, seed).inputs, None)
            token = steps.prefill(asked, 0, None)
            done.append((token, steps.cache.keys[:, 0, :, : asked.tokens].clone()))
            steps.release(0)
        return done

    with torch.inference_mode():
        replayed = prefills()
        steps.encoder_graphs = None
        eager = prefills()
        steps.encoder_graphs, steps.padded = graphs, False
        prefills()
    assert graphs.replays == 2, "replayed while padded only"
    assert batch.stats().encoder_replays == 2, "the engine's stats count them, for `/metrics`"
    assert len(captures) == 1
    for (token, keys), (eager_token, eager_keys) in zip(replayed, eager, strict=True):
        assert token == eager_token
        assert torch.equal(keys, eager_keys)
    assert not torch.equal(eager[1][1], eager[2][1]), "the images tell apart in the keys"
