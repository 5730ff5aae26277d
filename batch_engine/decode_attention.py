"""A decode step's attention over the slots as two Triton kernels (split-K, "flash-decoding"), for CUDA devices.

The grouped attention in `batch_engine.slots` computes a decode step's attention with a handful of kernels a layer:
two matrix products per chunk of the span, the mask, the softmax, a sum over the chunks. This does it in two: the
program for (row, KV head, split) loads that KV head's query heads once, walks its share of the span, reading K and
V only at the positions the row's mask keeps (the mask read inside the kernel, so no reduction a layer computes the
rows' lengths), and keeps a running maximum, sum and weighted sum of V (online softmax) in float32; a second kernel,
a program per (row, query head), weighs the splits' partial results by their maxima. K and V are read where the
slots hold them, never copied per query head.

Both run inside one operator, `batch_engine::decode_attention` (`torch.library.custom_op`), which `torch.compile`
keeps whole inside the compiled layers. Launched from them as a user-defined Triton kernel instead, the combine
after it (then torch code) ran uncompiled, as nine eager kernels a layer in a profile on an H100
(`bench/RESULTS.md`).

Without Triton (or on another device, `triton_kernels.runs_on`) the engine keeps the grouped attention.
`TRITON_INTERPRET=1` runs the kernel on the CPU (slowly), which is how the tests check it against the grouped
attention.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batch_engine.operators import define_operator
from batch_engine.triton_kernels import agrees, launch_options

if TYPE_CHECKING:
    import torch

BLOCK_N = 64
"""Stored positions per step of a program's loop."""
SPLITS = 16
"""Programs per (row, KV head): enough that one row keeps many multiprocessors reading."""


_KERNELS: Any = None
"""The two Triton kernels (`batch_engine.decode_kernel`: the splits, their combine) once `load` has imported them:
importing this module imports neither torch nor Triton, and a compiled decode step reads this instead of importing."""


def load() -> Any:
    """The kernels, imported on first use, and the operator `batch_engine::decode_attention` defined; the engine
    calls it before any layer is compiled."""
    global _KERNELS
    if _KERNELS is None:
        from batch_engine.decode_kernel import decode_combine, decode_split

        define_operator(
            "decode_attention",
            "(Tensor query, Tensor key, Tensor value, Tensor mask, float scale) -> Tensor",
            attend,
            lambda query, *_: (query.shape[0], 1, query.shape[1], query.shape[3]),
        )
        _KERNELS = decode_split, decode_combine
    return _KERNELS


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

    if _KERNELS is None:
        load()
    attention: torch.Tensor = torch.ops.batch_engine.decode_attention(query, key, value, mask, float(scale))
    return attention


def split(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first kernel: each (row, query head, split)'s weighted sum of V (batch, heads, splits, dim), its largest
    score and its sum of weights (batch, heads, splits), in float32; a split whose positions the mask all leaves
    out has the largest score -inf and weighs 0."""
    import torch

    batch, heads, _, dim = query.shape
    kv_heads, span = key.shape[1], key.shape[2]
    group = heads // kv_heads
    assert query.stride(-1) == key.stride(-1) == value.stride(-1) == 1, "the kernel reads each head's lanes in a row"
    rows = mask.reshape(batch, span)  # (batch, 1, 1, span): the same for every head
    # Always SPLITS programs per (row, KV head), each taking whole blocks: a split past a short span (or past a row's
    # last attended position) finds nothing and weighs 0. The grid and the buffers' shapes then do not depend on
    # the span.
    splits, per_split = SPLITS, -(-span // (SPLITS * BLOCK_N)) * BLOCK_N
    partial = torch.empty((batch, heads, splits, dim), dtype=torch.float32, device=query.device)
    maxima = torch.empty((batch, heads, splits), dtype=torch.float32, device=query.device)
    sums = torch.empty((batch, heads, splits), dtype=torch.float32, device=query.device)
    (_KERNELS or load())[0][(batch, kv_heads, splits)](
        query, key, value, rows, partial, maxima, sums,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), rows.stride(0), span, per_split, float(scale),
        group=group, block_g=max(16, _power_of_two(group)), head_dim=dim, block_d=max(16, _power_of_two(dim)),
        block_n=BLOCK_N, precision="ieee" if query.dtype == torch.float32 else "tf32", **launch_options(query.device),
    )  # fmt: skip
    return partial, maxima, sums


def attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Both kernels: `split`, then the combine, into (batch, 1, heads, dim) in `query`'s dtype."""
    import torch

    batch, heads, _, dim = query.shape
    partial, maxima, sums = split(query, key, value, mask, scale)
    out = torch.empty((batch, 1, heads, dim), dtype=query.dtype, device=query.device)
    (_KERNELS or load())[1][(batch * heads,)](
        partial,
        maxima,
        sums,
        out,
        splits=SPLITS,
        head_dim=dim,
        block_d=max(16, _power_of_two(dim)),
        **launch_options(query.device),
    )
    return out


def _power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()
