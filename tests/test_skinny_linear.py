"""The Triton kernel for a decode step's linear layers (`batch_engine.skinny_linear`), run by Triton's interpreter on
the CPU: equal to `torch.nn.functional.linear` for every row count it takes, routed to only for few rows, installed
in every layer without changing the model's weights or outputs, and the engine with it equal to plain `generate`
(cuBLAS's path, before the kernel was installed) token for token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from batch_engine import skinny_linear as module
from batch_engine.engine import BatchEngine
from batch_engine.projections import fuse_projections
from batch_engine.settings import EngineSettings
from batch_engine.skinny_linear import (
    MAX_ROWS,
    TILING,
    TILINGS,
    Tiling,
    routed_linear,
    row_limit,
    skinny_linear,
    use_kernel,
)
from bench.gpu_linear import SHAPES
from reasoning_stage.batched import REFUSALS
from reasoning_stage.chat_model import ChatModel
from tests.text_engine import BUDGET, QUESTIONS, ids_of, joining

pytestmark = pytest.mark.usefixtures("triton_interpreter")


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 32])
@pytest.mark.parametrize(("depth", "bias"), [(128, True), (100, False)])  # 100: the last block of lanes is partial
@pytest.mark.parametrize("tiling", [TILING, Tiling(16, 32, 4, 2)], ids=["engine", "small"])
def test_the_kernel_equals_linear_for_every_row_count_it_takes(
    rows: int, depth: int, bias: bool, tiling: Tiling
) -> None:
    generator = torch.Generator().manual_seed(rows)
    hidden = torch.randn((rows, 1, depth), generator=generator)
    weight = torch.randn((70, depth), generator=generator) / depth**0.5  # 70: the last block of outputs is partial
    offsets = torch.randn(70, generator=generator) if bias else None
    expected = torch.nn.functional.linear(hidden, weight, offsets)
    got = skinny_linear(hidden, weight, offsets, tiling)
    assert got.shape == (rows, 1, 70)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    half = skinny_linear(hidden.half(), weight.half(), None if offsets is None else offsets.half(), tiling)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), expected, rtol=0, atol=1e-2)


@pytest.mark.parametrize("rows", [1, MAX_ROWS])
@pytest.mark.parametrize("tiling", sorted(set(TILINGS.values()), key=str), ids=str)
def test_the_kernel_equals_linear_with_each_tiling_of_a_product_shape(rows: int, tiling: Tiling) -> None:
    generator = torch.Generator().manual_seed(rows)
    hidden = torch.randn((rows, 1, 300), generator=generator)  # 300: the last block of lanes is partial
    weight = torch.randn((70, 300), generator=generator) / 300**0.5
    torch.testing.assert_close(
        skinny_linear(hidden, weight, None, tiling), torch.nn.functional.linear(hidden, weight), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("limit", [None, 32], ids=["default", "own-limit"])
def test_only_steps_of_few_rows_take_the_kernel(monkeypatch: pytest.MonkeyPatch, limit: int | None) -> None:
    """At most `MAX_ROWS` rows, or a product shape's own limit in `ROW_LIMITS`; more go to cuBLAS."""
    if limit is not None:
        monkeypatch.setattr(module, "ROW_LIMITS", {(24, 64): limit})
    most = limit or MAX_ROWS
    taken: list[int] = []

    def recording(hidden: torch.Tensor, *args: Any) -> torch.Tensor:
        taken.append(hidden.numel() // hidden.shape[-1])
        return skinny_linear(hidden, *args)

    monkeypatch.setattr(module, "skinny_linear", recording)
    generator = torch.Generator().manual_seed(0)
    # scaled so that outputs are about 1: an absolute 1e-5 is then a few float32 roundings of a 64-term sum
    weight, bias = torch.randn((24, 64), generator=generator) / 8, torch.randn(24, generator=generator)
    for shape in [(1, 1, 64), (MAX_ROWS, 1, 64), (1, most, 64), (most + 1, 1, 64), (1, 300, 64)]:
        hidden = torch.randn(shape, generator=generator)
        torch.testing.assert_close(
            routed_linear(hidden, weight, bias), torch.nn.functional.linear(hidden, weight, bias), rtol=0, atol=1e-5
        )
    assert taken == [1, MAX_ROWS, most]


def test_glms_output_and_down_products_take_the_kernel_up_to_32_rows() -> None:
    """`ROW_LIMITS` keyed (out, in) as the weights are shaped: the output and down products 32 rows, the others 16."""
    limits = {name: row_limit(cols, depth) for name, depth, cols, _ in SHAPES}
    assert limits == {"qkv_proj": MAX_ROWS, "o_proj": 32, "gate_up_proj": MAX_ROWS, "down_proj": 32}


@pytest.mark.parametrize("fused", [False, True])
def test_every_linear_layer_of_the_decoder_is_routed_and_the_model_answers_the_same(
    checkpoint: Path, fused: bool
) -> None:
    model: Any = ChatModel.load(str(checkpoint), device="cpu", dtype="float32", local_files_only=True).model
    decoder = model.model
    if fused:
        fuse_projections(decoder)
    names = sorted(model.state_dict())
    tokens = torch.tensor([[1, 5, 9, 4, 7]])
    with torch.inference_mode():
        before = [model(tokens).logits, model(tokens[:1, :1]).logits]
    linears = sum(type(m) is torch.nn.Linear for m in decoder.layers.modules())
    routed = use_kernel(decoder)
    assert routed == linears + (len(decoder.layers) if fused else 0)
    assert not any(type(m) is torch.nn.Linear for m in decoder.layers.modules())
    assert type(model.lm_head) is torch.nn.Linear, "only the decoder's layers"
    assert sorted(model.state_dict()) == names, "the same weights under the same names"
    with torch.inference_mode():
        after = [model(tokens).logits, model(tokens[:1, :1]).logits]  # five rows and one: both through the kernel
    for old, new in zip(before, after, strict=True):
        torch.testing.assert_close(new, old, rtol=0, atol=1e-4)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_engine_with_both_kernels_equals_plain_generate(checkpoint: Path, compiled: bool) -> None:
    """Plain `generate` runs first, before the engine installs the kernels: cuBLAS's answers are the reference.
    Compiled, each kernel is one opaque operator in the layers' graphs, as on a GPU: the only places a compiled
    layer's graph breaks is a prefill's or extend step's KV write, uncompiled by design (`batch_engine.slots`; a
    decode step's write is in the graph, `test_slot_cache.py`; the attention of a prefill with rows riding along is
    an operator too). (Called as
    user-defined Triton kernels, the decode attention's launch broke the graph too, and the torch code after it ran
    uncompiled.)"""
    from torch._dynamo.utils import counters

    chat = ChatModel.load(str(checkpoint), device="cpu", dtype="float32", local_files_only=True)
    prompts = [ids_of(chat, question) for question in QUESTIONS]
    expected = [chat.complete(prompt, max_new_tokens=BUDGET - n, temperature=0.0) for n, prompt in enumerate(prompts)]
    settings = EngineSettings(
        slots=4, max_tokens=256, linear_kernel=True, decode_kernel=True, compile=compiled, ride_along=True
    )
    engine = BatchEngine(chat.model, settings, REFUSALS)
    assert engine.device.linear_kernel
    assert engine.device.decode_step.kernel
    counters.clear()
    assert joining(engine, prompts) == expected
    breaks = list(counters["graph_break"])
    uncompiled = ("SlotCache._write_span",) if compiled else ()
    assert len(breaks) == len(uncompiled), breaks
    assert all(any(name in reason for reason in breaks) for name in uncompiled), breaks


def test_auto_keeps_the_kernel_only_where_it_runs_and_agrees(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cpu = torch.device("cpu")
    assert module.works_on(cpu, torch.float32)
    assert module.works_on(cpu, torch.float16)
    real = module.skinny_linear

    def wrong(*args: Any) -> torch.Tensor:
        return real(*args) + 0.2

    def broken(*args: Any) -> torch.Tensor:
        raise RuntimeError("PassManager::run failed")  # as Triton says it when a GPU lacks an instruction

    monkeypatch.setattr(module, "skinny_linear", wrong)
    assert not module.works_on(cpu, torch.float32)
    assert "the Triton linear kernel differs from cuBLAS by 0.2 on cpu in torch.float32: cuBLAS instead" in caplog.text
    monkeypatch.setattr(module, "skinny_linear", broken)
    assert not module.works_on(cpu, torch.float32)
    assert "the Triton linear kernel does not run on cpu in torch.float32: cuBLAS instead" in caplog.text


def test_the_check_at_start_runs_each_tiling_at_the_most_rows_the_engine_gives_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A program's memory grows with its tiling and rows: a device short of it for one variant keeps cuBLAS."""
    cpu, real = torch.device("cpu"), module.skinny_linear
    seen: list[tuple[Tiling, int]] = []

    def recording(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tiling: Tiling) -> torch.Tensor:
        seen.append((tiling, hidden.shape[0]))
        return real(hidden, weight, bias, tiling)

    monkeypatch.setattr(module, "skinny_linear", recording)
    assert module.works_on(cpu, torch.float32)
    assert seen == module.cases()
    assert (TILINGS[(4096, 4096)], 32) in seen
    assert (TILING, MAX_ROWS) in seen

    def short_of_memory(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tiling: Tiling) -> torch.Tensor:
        if hidden.shape[0] > MAX_ROWS:  # as Triton says it
            raise RuntimeError("out of resource: shared memory, Required: 163840, Hardware limit: 101376")
        return real(hidden, weight, bias, tiling)

    monkeypatch.setattr(module, "skinny_linear", short_of_memory)
    assert not module.works_on(cpu, torch.float32)
    assert "the Triton linear kernel does not run on cpu in torch.float32: cuBLAS instead" in caplog.text


def test_the_kernel_is_off_on_the_cpu_by_default_and_refused_there_when_asked_for(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chat = ChatModel.load(str(checkpoint), device="cpu", dtype="float32", local_files_only=True)
    assert not BatchEngine(chat.model, EngineSettings(slots=1, max_tokens=256), REFUSALS).device.linear_kernel
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="the Triton linear kernel needs Triton and a CUDA device, not cpu"):
        BatchEngine(chat.model, EngineSettings(slots=1, max_tokens=256, linear_kernel=True), REFUSALS)
