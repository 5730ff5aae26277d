"""The Triton kernel of `batch_engine.skinny_linear` (its docstring says what it computes), in a module of its own:
Triton reads the kernel's source and its module's globals, and only `skinny_linear` imports this, when a decode step
first needs it."""

# mypy: disable-error-code="no-untyped-def"
# No annotations on the kernel's arguments: Triton and torch.compile compile its source text.

import triton
import triton.language as tl


@triton.jit  # type: ignore[untyped-decorator]
def skinny_product(
    inputs, weight, bias, out, rows, cols, depth, in_row, weight_row, out_row,
    has_bias: tl.constexpr, block_m: tl.constexpr, block_n: tl.constexpr, block_k: tl.constexpr,
    even_k: tl.constexpr, precision: tl.constexpr, pdl: tl.constexpr,
):  # fmt: skip
    first = tl.program_id(0) * block_n
    members = tl.arange(0, block_m)
    outputs = first + tl.arange(0, block_n)
    if pdl:  # launched while the kernel before is finishing: wait for its results, then let the next one start
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    lanes = tl.arange(0, block_k)
    in_rows, in_cols = members < rows, outputs < cols
    # A weight's row times its stride passes 2**31 elements in no model here, but the products are cheap: 64-bit.
    w_base = weight + outputs.to(tl.int64)[:, None] * weight_row
    x_base = inputs + members.to(tl.int64)[:, None] * in_row
    total = tl.zeros([block_m, block_n], tl.float32)
    for start in range(0, depth, block_k):
        at = start + lanes
        if even_k:
            x = tl.load(x_base + at[None, :], mask=in_rows[:, None], other=0.0)
            w = tl.load(w_base + at[None, :], mask=in_cols[:, None], other=0.0)
        else:
            inside = at < depth
            x = tl.load(x_base + at[None, :], mask=in_rows[:, None] & inside[None, :], other=0.0)
            w = tl.load(w_base + at[None, :], mask=in_cols[:, None] & inside[None, :], other=0.0)
        total += tl.dot(x, tl.trans(w), input_precision=precision)
    if has_bias:
        total += tl.load(bias + outputs, mask=in_cols, other=0.0).to(tl.float32)[None, :]
    target = out + members.to(tl.int64)[:, None] * out_row + outputs[None, :]
    tl.store(target, total.to(out.dtype.element_ty), mask=in_rows[:, None] & in_cols[None, :])
