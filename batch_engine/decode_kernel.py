"""The Triton kernels of `batch_engine.decode_attention` (its docstring says what they compute), in a module of their
own: Triton reads a kernel's source and its module's globals, and only `decode_attention` imports this, when a
decode step first needs it."""

# mypy: disable-error-code="no-untyped-def"
# No annotations on the kernel's arguments: Triton and torch.compile compile its source text.

import triton
import triton.language as tl


@triton.jit  # type: ignore[untyped-decorator]
def decode_split(
    query, keys, values, mask, partial, maxima, sums,
    q_row, q_head, k_row, k_head, k_pos, v_row, v_head, v_pos, mask_row,
    span, per_split, scale: tl.constexpr,
    group: tl.constexpr, block_g: tl.constexpr, head_dim: tl.constexpr, block_d: tl.constexpr,
    block_n: tl.constexpr, precision: tl.constexpr, pdl: tl.constexpr,
):  # fmt: skip
    if pdl:  # launched while the kernel before is finishing: wait for its results, then let the next one start
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # A slot's stride times its row can pass 2**31 elements (128 slots of 131,072 positions): 64-bit offsets.
    row_offset, kv_offset = row.to(tl.int64), kv_head.to(tl.int64)
    members = tl.arange(0, block_g)
    lanes = tl.arange(0, block_d)
    in_group, in_dim = members < group, lanes < head_dim
    heads = kv_head * group + members
    q = tl.load(
        query + row_offset * q_row + heads[:, None] * q_head + lanes[None, :],
        mask=in_group[:, None] & in_dim[None, :],
        other=0.0,
    )
    start = split * per_split
    end = tl.minimum(start + per_split, span)
    top = tl.full([block_g], float("-inf"), tl.float32)
    total = tl.zeros([block_g], tl.float32)
    weighted = tl.zeros([block_g, block_d], tl.float32)
    k_base = keys + row_offset * k_row + kv_offset * k_head
    v_base = values + row_offset * v_row + kv_offset * v_head
    for first in range(start, end, block_n):
        positions = first + tl.arange(0, block_n)
        # The row's mask says which positions it attends to; K and V are read only there.
        present = tl.load(mask + row_offset * mask_row + positions, mask=positions < end, other=0) != 0
        block_mask = present[:, None] & in_dim[None, :]
        k = tl.load(k_base + positions[:, None] * k_pos + lanes[None, :], mask=block_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=precision) * scale
        scores = tl.where(present[None, :], scores, float("-inf"))
        new_top = tl.maximum(top, tl.max(scores, 1))
        # Until a split meets a position it attends to, its maximum is -inf: weigh against 0 there, not -inf - -inf.
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)
        fade = tl.exp(top - shift)
        weights = tl.exp(scores - shift[:, None])
        total = total * fade + tl.sum(weights, 1)
        v = tl.load(v_base + positions[:, None] * v_pos + lanes[None, :], mask=block_mask, other=0.0)
        weighted = weighted * fade[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=precision)
        top = new_top
    out = (row * group * tl.num_programs(1) + heads) * tl.num_programs(2) + split
    tl.store(partial + out[:, None] * head_dim + lanes[None, :], weighted, mask=in_group[:, None] & in_dim[None, :])
    tl.store(maxima + out, top, mask=in_group)
    tl.store(sums + out, total, mask=in_group)


@triton.jit  # type: ignore[untyped-decorator]
def decode_combine(
    partial, maxima, sums, out, splits: tl.constexpr, head_dim: tl.constexpr, block_d: tl.constexpr, pdl: tl.constexpr
):
    if pdl:  # as in `decode_split`
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    # One program per (row, query head): its splits' partial results weighed by their maxima against the largest.
    head = tl.program_id(0)
    parts = head * splits + tl.arange(0, splits)
    lanes = tl.arange(0, block_d)
    in_dim = lanes < head_dim
    top = tl.load(maxima + parts)
    fades = tl.exp(top - tl.max(top, 0))  # a split that found nothing has -inf: its fade is 0
    total = tl.sum(tl.load(sums + parts) * fades, 0)
    weighted = tl.load(partial + parts[:, None] * head_dim + lanes[None, :], mask=in_dim[None, :], other=0.0)
    result = tl.sum(weighted * fades[:, None], 0) / total
    tl.store(out + head * head_dim + lanes, result.to(out.dtype.element_ty), mask=in_dim)
