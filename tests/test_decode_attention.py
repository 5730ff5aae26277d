"""The Triton decode attention (`batch_engine.decode_attention`) against the grouped attention it replaces, run by
Triton's interpreter on the CPU in float32: rows of different lengths (one position, all of the span, a part of a
split), GQA groups and head sizes that are not powers of two, K and V read as views of larger slots. The engine with
it against plain `generate` is in `test_batching.py` (GLM-4.6V) and `test_local_engine.py` (GLM-4, Llama)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from batch_engine.decode_attention import decode_attention
from batch_engine.engine import BatchEngine
from batch_engine.settings import EngineSettings
from batch_engine.slots import _grouped_attention
from batch_engine.triton_kernels import runs_on


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "span", "lengths"),
    [
        (4, 2, 16, 256, (0, 255, 37)),  # one position; the whole span; within the first split
        (32, 2, 128, 512, (300, 64, 511)),  # GLM-4's heads; a length on a split's edge
        (6, 2, 24, 256, (130,)),  # a group of 3 and a head of 24: padded inside the kernel
        (8, 8, 32, 1024, (1023, 500)),  # no grouping
    ],
)
def test_the_kernel_equals_the_grouped_attention(
    triton_interpreter: None, heads: int, kv_heads: int, dim: int, span: int, lengths: tuple[int, ...]
) -> None:
    generator = torch.Generator().manual_seed(span + heads)
    batch, capacity = len(lengths), span + 256
    keys = torch.randn((batch + 1, kv_heads, capacity, dim), generator=generator)
    values = torch.randn((batch + 1, kv_heads, capacity, dim), generator=generator)
    query = torch.randn((batch, heads, 1, dim), generator=generator)
    last = torch.tensor(lengths).view(batch, 1)
    mask = (torch.arange(span).view(1, span) <= last).view(batch, 1, 1, span)
    key, value, scale = keys[:batch, :, :span], values[:batch, :, :span], dim**-0.5
    got = decode_attention(query, key, value, mask, scale)
    expected = _grouped_attention(query, key, value, mask, scale)
    assert got.shape == expected.shape == (batch, 1, heads, dim)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    changed = values.clone()
    changed[:batch, :, span - 1] += 1.0  # the last position of the span: only a row that reaches it may change
    moved = decode_attention(query, keys[:batch, :, :span], changed[:batch, :, :span], mask, scale)
    for row, length in enumerate(lengths):
        assert torch.equal(moved[row], got[row]) == (length < span - 1)


def test_the_kernel_reads_what_the_mask_keeps_not_a_length(triton_interpreter: None) -> None:
    """A mask with gaps: a whole split left out between kept positions, a row's own position left out, a row that
    keeps only its last position. The kernel reads the mask, as the grouped attention does."""
    generator = torch.Generator().manual_seed(5)
    batch, heads, kv_heads, dim, span = 3, 8, 2, 32, 2048
    keys, values = (torch.randn((batch, kv_heads, span, dim), generator=generator) for _ in "kv")
    query = torch.randn((batch, heads, 1, dim), generator=generator)
    mask = torch.zeros((batch, 1, 1, span), dtype=torch.bool)
    mask[0, ..., :10] = mask[0, ..., 1500:1510] = True  # the splits between them find nothing
    mask[1, ..., 1:700] = True
    mask[1, ..., 300] = False
    mask[2, ..., span - 1] = True
    got = decode_attention(query, keys, values, mask, dim**-0.5)
    expected = _grouped_attention(query, keys, values, mask, dim**-0.5)
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_kernel_in_half_precision_stays_close_to_float32(triton_interpreter: None) -> None:
    """The reduced-precision path (`weights` cast to V's dtype, no `ieee` products); the interpreter runs float16
    right but not bfloat16, whose path is the same (`works_on` checks it on the GPU at start)."""
    generator = torch.Generator().manual_seed(3)
    keys, values = (torch.randn((2, 2, 512, 128), generator=generator) for _ in "kv")
    query = torch.randn((2, 32, 1, 128), generator=generator)
    mask = (torch.arange(512).view(1, 512) <= torch.tensor([[200], [511]])).view(2, 1, 1, 512)
    expected = _grouped_attention(query, keys, values, mask, 128**-0.5)
    got = decode_attention(query.half(), keys.half(), values.half(), mask, 128**-0.5)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=5e-3)


def test_the_kernel_is_off_on_the_cpu_by_default_and_refused_there_when_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not runs_on(torch.device("cpu"))
    model = _tiny_model()
    assert not BatchEngine(model, EngineSettings(slots=1, max_tokens=256)).device.decode_step.kernel
    with pytest.raises(ValueError, match="needs Triton and a CUDA device, not cpu"):
        BatchEngine(model, EngineSettings(slots=1, max_tokens=256, decode_kernel=True))


def _tiny_model() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()  # type: ignore[no-untyped-call]


def test_auto_keeps_the_kernel_only_where_it_runs_and_agrees(
    triton_interpreter: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from batch_engine import decode_attention as module

    cpu = torch.device("cpu")
    assert module.works_on(cpu, torch.float32, heads=4, kv_heads=2, dim=16)
    assert module.works_on(cpu, torch.float16, heads=6, kv_heads=2, dim=24)  # (the interpreter's bfloat16 is not)
    real = module.decode_attention

    def wrong(query: torch.Tensor, *args: Any) -> torch.Tensor:
        return real(query, *args) + 0.1

    def broken(*args: Any) -> torch.Tensor:
        raise RuntimeError("PassManager::run failed")  # as Triton says it when a GPU lacks an instruction

    monkeypatch.setattr(module, "decode_attention", wrong)
    assert not module.works_on(cpu, torch.float32, heads=4, kv_heads=2, dim=16)
    assert "differs from the grouped attention by 0.1" in caplog.text
    monkeypatch.setattr(module, "decode_attention", broken)
    assert not module.works_on(cpu, torch.float32, heads=4, kv_heads=2, dim=16)
    assert "does not run on cpu in torch.float32: the grouped attention instead" in caplog.text
