"""The slot KV cache's writes (`batch_engine.slots.SlotCache`): a decode step's is traced into the compiled layer's
graph and writes the cache in place. A prefill's stays outside (`test_skinny_linear.py` sees it as the only graph
break); the engine against plain `generate` is in `test_batching.py`, `test_local_engine.py` and there."""

from __future__ import annotations

import re

import torch
from torch._inductor.utils import run_and_get_code

from batch_engine.slots import Decode, cache_class


def test_a_decode_write_compiles_into_the_graph_in_place() -> None:
    """`fullgraph=True` fails on any graph break. The generated code allocates nothing of a layer's slab or the whole
    cache: indexed by an int layer, inductor copied the layer's slab out and back at every step."""
    cache = cache_class()(layers=3, slots=4, max_tokens=256, kv_heads=2, head_dim=8, dtype=torch.float32, device="cpu")
    generator = torch.Generator().manual_seed(0)
    key, value = (torch.randn((2, 2, 1, 8), generator=generator) for _ in "kv")
    lengths = torch.tensor([5, 9])
    cache.target = Decode(torch.arange(2), lengths, 128)

    def step(key: torch.Tensor, value: torch.Tensor, layer: int) -> torch.Tensor:
        keys, values = cache.update(key * 2 + 1, value, layer)  # a product before it, as the rotary is
        total: torch.Tensor = (keys.sum(-1) + values.sum(-1)).sum()
        return total

    total, (code,) = run_and_get_code(torch.compile(step, fullgraph=True), key, value, 1)
    allocated = re.findall(r"empty_strided_cpu\(\(([^)]*)\)", code)
    assert all(size.count(",") < 3 for size in allocated), allocated  # nothing of 4 dimensions or more
    for row, length in enumerate(lengths.tolist()):
        assert torch.equal(cache.keys[1, row, :, length], key[row, :, 0] * 2 + 1)
        assert torch.equal(cache.values[1, row, :, length], value[row, :, 0])
    assert cache.keys[0].abs().sum() == cache.keys[2].abs().sum() == 0  # the other layers untouched
    assert cache.keys[1].count_nonzero() == 2 * 2 * 8
    expected = cache.keys[1, :2, :, :128].sum(-1) + cache.values[1, :2, :, :128].sum(-1)
    torch.testing.assert_close(total, expected.sum())
