"""The engine's Triton kernels on a CUDA GPU, compiled by Triton for the device (the CPU tests run them through
Triton's interpreter): the linear kernel on GLM-4's own shapes, eager and inside `torch.compile`.

    .venv/bin/python -m pytest -m gpu tests/gpu -q

Never runs in CI: the `gpu` marker is deselected by default, and every test is skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from batch_engine.skinny_linear import MAX_ROWS, routed_linear, skinny_linear
from bench.gpu_linear import SHAPES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("rows", [1, 8, MAX_ROWS])
@pytest.mark.parametrize(("name", "depth", "cols", "bias"), SHAPES, ids=[shape[0] for shape in SHAPES])
def test_the_linear_kernel_equals_cublas_in_bfloat16(rows: int, name: str, depth: int, cols: int, bias: bool) -> None:
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
