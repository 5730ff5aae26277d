"""The slot KV cache's writes (`batch_engine.slots.SlotCache`): a decode step's is traced into the compiled layer's
graph, writes the cache in place and leaves the layer index symbolic. A prefill's stays outside
(`test_skinny_linear.py` sees it as the only graph break); the engine against plain `generate` is in
`test_batching.py`, `test_local_engine.py` and there."""

from __future__ import annotations

import re
from unittest import mock

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.graph import GraphLowering

from batch_engine.compiling import use_dynamo_settings
from batch_engine.slots import Decode, cache_class


class _Layer(torch.nn.Module):
    """What a decoder layer does around the write: a product before it (the rotary's place), a read after it."""

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, key: torch.Tensor, value: torch.Tensor, cache: object) -> torch.Tensor:
        keys, values = cache.update(key * 2 + 1, value, self.layer_idx)  # type: ignore[attr-defined]
        total: torch.Tensor = (keys.sum(-1) + values.sum(-1)).sum()
        return total


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
        ),
    ],
)
def test_a_decode_write_compiles_into_the_layer_in_place_for_every_layer(device: str) -> None:
    """Compiled as the engine compiles its layers, with `fullgraph` (which fails on any graph break): the generated
    code allocates nothing of a layer's slab or the whole cache (indexed by an int layer, inductor copied the layer's
    slab out and back at every step), and all layers after the first share one graph (indexed as
    `keys[layer_idx, :batch]`, dynamo made a graph a layer and ran the layers past its recompile limit uncompiled)."""
    use_dynamo_settings()
    cache = cache_class()(layers=5, slots=4, max_tokens=256, kv_heads=2, head_dim=8, dtype=torch.float32, device=device)
    generator = torch.Generator().manual_seed(0)
    key, value = (torch.randn((2, 2, 1, 8), generator=generator).to(device) for _ in "kv")
    lengths = torch.tensor([5, 9], device=device)
    cache.target = Decode(torch.arange(2, device=device), lengths, 128)
    layers = [_Layer(index) for index in range(5)]
    for layer in layers:
        layer.compile(fullgraph=True)
    counters.clear()
    codes: list[str] = []
    for index, layer in enumerate(layers):
        with mock.patch.object(GraphLowering, "save_output_code", codes.append):  # as `run_and_get_code`, no reset
            total = layer(key, value, cache)
        for row, length in enumerate(lengths.tolist()):
            assert torch.equal(cache.keys[index, row, :, length], key[row, :, 0] * 2 + 1)
            assert torch.equal(cache.values[index, row, :, length], value[row, :, 0])
        assert cache.keys[index].count_nonzero() == 2 * 2 * 8  # that row and position only
        expected = cache.keys[index, :2, :, :128].sum(-1) + cache.values[index, :2, :, :128].sum(-1)
        torch.testing.assert_close(total, expected.sum())
    assert counters["stats"]["unique_graphs"] == len(codes) == 2
    allocated = [size for code in codes for size in re.findall(rf"empty_strided_{device}\(\(([^)]*)\)", code)]
    assert allocated  # the sums' results: the pattern reads this inductor's code
    assert all(size.count(",") < 3 for size in allocated), allocated  # nothing of 4 dimensions or more


def test_a_riding_prefill_hands_the_attention_its_prompt_queries_in_strides_of_the_prompt_s_length_only() -> None:
    """cuDNN's attention builds a plan for each new set of sizes and strides (`bench/gpu_sdpa_shapes.py`): the prompt's
    queries, cut from the layer's queries for the prompt and the riding rows, must not carry the rows' count in their
    strides, or each count of riding rows would be a first meeting."""
    from batch_engine.slots import _ride_along_attention

    heads, kv_heads, dim, new, slots, capacity = 4, 2, 8, 10, 5, 64
    generator = torch.Generator().manual_seed(0)
    seen: list[tuple[int, ...]] = []
    attend = torch.nn.functional.scaled_dot_product_attention

    def recording(query: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(query.stride())
        return attend(query, *args, **kwargs)  # type: ignore[arg-type]

    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", recording):
        for rows, positions_outer in ((1, True), (2, True), (3, False)):
            # as a layer hands them, (1, positions, heads, dim) in memory seen as (1, heads, positions, dim), or not
            if positions_outer:
                query = torch.randn((1, new + rows, heads, dim), generator=generator).transpose(1, 2)
            else:
                query = torch.randn((1, heads, new + rows, dim), generator=generator)
            key, value = (torch.randn((slots, kv_heads, capacity, dim), generator=generator) for _ in "kv")
            mask = torch.ones((rows, 1, 1, 16), dtype=torch.bool)
            out = _ride_along_attention(query, key, value, mask, dim**-0.5, False)
            assert out.shape == (1, new + rows, heads, dim)
    assert seen == [(new * heads * dim, dim, heads * dim, 1)] * 3
