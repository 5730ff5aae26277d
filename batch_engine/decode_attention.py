"""A decode step's attention over the slots as one Triton kernel (split-K, "flash-decoding"), for CUDA devices.

The grouped attention in `batch_engine.slots` computes a decode step's attention with a handful of kernels a layer:
two matrix products per chunk of the span, the mask, the softmax, a sum over the chunks. This does it in one kernel
and a small combine: the program for (row, KV head, split) loads that KV head's query heads once, walks its share
of the row's stored positions (only those up to the row's length, not the whole span bucket), and keeps a running
maximum, sum and weighted sum of V (online softmax) in float32; the combine weighs the splits' partial results by
their maxima. K and V are read where the slots hold them, never copied per query head.

Without Triton (or on another device, `triton_kernels.runs_on`) the engine keeps the grouped attention.
`TRITON_INTERPRET=1` runs the kernel on the CPU (slowly), which is how the tests check it against the grouped
attention.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batch_engine.triton_kernels import agrees

if TYPE_CHECKING:
    import torch

BLOCK_N = 64
"""Stored positions per step of a program's loop."""
SPLITS = 16
"""Programs per (row, KV head): enough that one row keeps many multiprocessors reading."""


_KERNEL: Any = None
"""The Triton kernel (`batch_engine.decode_kernel`) once `load` has imported it: importing this module imports
neither torch nor Triton, and a compiled decode step reads this instead of importing."""


def load() -> Any:
    """The kernel, imported on first use."""
    global _KERNEL
    if _KERNEL is None:
        from batch_engine.decode_kernel import decode_split

        _KERNEL = decode_split
    return _KERNEL


def works_on(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, dim: int) -> bool:
    """Whether the kernel compiles and runs on `device` with the model's `dtype` and head layout, and agrees with the
    grouped attention there (`decode_kernel` `auto`; `triton_kernels.agrees`)."""
    import torch

    from batch_engine.slots import _grouped_attention

    generator = torch.Generator(device).manual_seed(0)
    batch, span = 2, 512
    keys, values = (torch.randn((batch, kv_heads, span, dim), generator=generator, device=device) for _ in "kv")
    query = torch.randn((batch, heads, 1, dim), generator=generator, device=device)
    mask = (torch.arange(span, device=device).view(1, span) <= torch.tensor([[100], [511]], device=device)).view(
        batch, 1, 1, span
    )
    expected = _grouped_attention(query, keys, values, mask, dim**-0.5)

    def run() -> torch.Tensor:
        return decode_attention(query.to(dtype), keys.to(dtype), values.to(dtype), mask, dim**-0.5)

    # bfloat16 rounding of the inputs is about 0.01 here
    return agrees("the Triton decode attention", "the grouped attention", run, expected, 0.05, f"{device} in {dtype}")


def decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """One new token's attention per row: `query` (batch, heads, 1, dim); `key` and `value` (batch, KV heads, span,
    dim), views of the slots; `mask` (batch, 1, 1, span), true up to and including each row's new position.
    Returns (batch, 1, heads, dim), as the grouped attention does."""
    import torch

    batch, heads, _, dim = query.shape
    kv_heads, span = key.shape[1], key.shape[2]
    group = heads // kv_heads
    lengths = mask.view(batch, span).sum(-1, dtype=torch.int32)  # a row attends to its first `length` positions
    assert query.stride(-1) == key.stride(-1) == value.stride(-1) == 1, "the kernel reads each head's lanes in a row"
    # Always SPLITS programs per (row, KV head), each taking whole blocks: a split past a short span (or past a row's
    # length) finds nothing and weighs 0. The grid and the buffers' shapes then do not depend on the span, so the
    # compiled layers are not compiled again per span bucket (their recompile limit is shared with the other steps).
    splits, per_split = SPLITS, -(-span // (SPLITS * BLOCK_N)) * BLOCK_N
    partial = torch.empty((batch, heads, splits, dim), dtype=torch.float32, device=query.device)
    maxima = torch.empty((batch, heads, splits), dtype=torch.float32, device=query.device)
    sums = torch.empty((batch, heads, splits), dtype=torch.float32, device=query.device)
    (_KERNEL or load())[(batch, kv_heads, splits)](
        query, key, value, lengths, partial, maxima, sums,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), per_split, float(scale),
        group=group, block_g=max(16, _power_of_two(group)), head_dim=dim, block_d=max(16, _power_of_two(dim)),
        block_n=BLOCK_N, precision="ieee" if query.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    top = maxima.amax(-1, keepdim=True)
    fades = torch.exp(maxima - top)  # a split past the row's length has -inf: its fade is 0
    out = (partial * fades.unsqueeze(-1)).sum(2) / (sums * fades).sum(-1, keepdim=True)
    return out.to(query.dtype).view(batch, 1, heads, dim)


def _power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()
