"""The engine's Triton kernels on a CUDA GPU, compiled by Triton for the device (the CPU tests run them through
Triton's interpreter): the linear kernel and the decode attention on GLM-4's own shapes, eager and inside
`torch.compile`.

    .venv/bin/python -m pytest -m gpu tests/gpu -q
    .venv/bin/python -m pytest -m gpu tests/test_slot_cache.py -q   # a decode step's KV write, compiled for CUDA

Never runs in CI: the `gpu` marker is deselected by default, and every test is skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from batch_engine.skinny_linear import MAX_ROWS, routed_linear, row_limit, skinny_linear
from bench.gpu_linear import SHAPES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("rows", [1, 8, MAX_ROWS, 32])
@pytest.mark.parametrize(("name", "depth", "cols", "bias"), SHAPES, ids=[shape[0] for shape in SHAPES])
def test_the_linear_kernel_equals_cublas_in_bfloat16(rows: int, name: str, depth: int, cols: int, bias: bool) -> None:
    limit = row_limit(cols, depth)
    assert limit == (32 if name in ("o_proj", "down_proj") else MAX_ROWS)
    if rows > limit:
        pytest.skip(f"the engine sends {name} at most {limit} rows")
    generator = torch.Generator("cuda").manual_seed(rows)
    hidden = torch.randn((rows, 1, depth), generator=generator, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn((cols, depth), generator=generator, device="cuda", dtype=torch.bfloat16) * depth**-0.5
    offsets = torch.randn(cols, generator=generator, device="cuda", dtype=torch.bfloat16) if bias else None
    exact = torch.nn.functional.linear(hidden.float(), weight.float(), None if offsets is None else offsets.float())
    cublas = torch.nn.functional.linear(hidden, weight, offsets).float()
    compiled = torch.compile(routed_linear, dynamic=True)
    for got in (skinny_linear(hidden, weight, offsets), compiled(hidden, weight, offsets)):
        assert got.dtype == torch.bfloat16
        # no further from the float32 product than cuBLAS's own bfloat16 answer, give or take one rounding
        assert (got.float() - exact).abs().max() <= (cublas - exact).abs().max() + 0.02


@pytest.mark.parametrize("batch", [1, 8, 32])
def test_the_decode_attention_operator_equals_the_grouped_attention_in_bfloat16(batch: int) -> None:
    """GLM-4's heads (32 over 2 KV heads of 128), rows of different lengths in a span of 1,536, K and V as views of
    larger slots; eager and inside `torch.compile`, where the operator stays one node."""
    from batch_engine import decode_attention
    from batch_engine.slots import _grouped_attention

    decode_attention.load()
    generator = torch.Generator("cuda").manual_seed(batch)
    span, dim = 1536, 128
    keys, values = (
        torch.randn((batch, 2, span + 256, dim), generator=generator, device="cuda", dtype=torch.bfloat16) for _ in "kv"
    )
    query = torch.randn((batch, 32, 1, dim), generator=generator, device="cuda", dtype=torch.bfloat16)
    lengths = torch.randint(1, span, (batch, 1), generator=generator, device="cuda")
    mask = (torch.arange(span, device="cuda").view(1, span) < lengths).view(batch, 1, 1, span)
    key, value, scale = keys[:, :, :span], values[:, :, :span], dim**-0.5
    exact = _grouped_attention(query.float(), key.float(), value.float(), mask, scale)
    compiled = torch.compile(decode_attention.decode_attention, dynamic=True)
    for got in (
        decode_attention.decode_attention(query, key, value, mask, scale),
        compiled(query, key, value, mask, scale),
    ):
        assert got.dtype == torch.bfloat16
        assert got.shape == (batch, 1, 32, dim)
        # bfloat16's rounding of the result and of the weights inside the kernel: well under 1 % of each value
        assert ((got.float() - exact).abs() <= 0.01 + 0.01 * exact.abs()).all()


def test_the_kernels_launched_dependent_inside_a_cuda_graph_read_what_the_kernel_before_wrote(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Programmatic dependent launch (`EngineSettings.dependent_launch`) starts a kernel while the one before it is
    finishing; each must still read that kernel's results. A captured chain (a torch kernel writes the input, the
    linear kernel, a torch kernel, the decode attention, the linear kernel), replayed on new inputs, gives exactly
    what the same chain launched without it gives."""
    from batch_engine import decode_attention, skinny_linear, triton_kernels

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    skinny_linear.load()
    decode_attention.load()
    generator = torch.Generator("cuda").manual_seed(0)
    dim, span = 128, 1024

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device="cuda", dtype=torch.bfloat16)

    weight_in, weight_out = randn(32 * dim, 4096) * 4096**-0.5, randn(4096, 32 * dim) * 4096**-0.5
    keys, values = randn(1, 2, span, dim), randn(1, 2, span, dim)
    mask = torch.ones((1, 1, 1, span), dtype=torch.bool, device="cuda")
    source = randn(1, 4096)

    def chain() -> torch.Tensor:
        query = skinny_linear.skinny_linear(source * 2, weight_in).view(1, 32, 1, dim) + 1
        attended = decode_attention.decode_attention(query, keys, values, mask, dim**-0.5)
        return skinny_linear.skinny_linear(attended.reshape(1, 32 * dim), weight_out)

    inputs = [randn(1, 4096) for _ in range(4)]
    expected = []
    for value in inputs:
        source.copy_(value)
        expected.append(chain().clone())
    monkeypatch.setattr(triton_kernels, "_DEPENDENT_LAUNCH", True)
    chain()  # compiles the kernels' variants with the waits before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    for value, want in zip(inputs, expected, strict=True):
        source.copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)
