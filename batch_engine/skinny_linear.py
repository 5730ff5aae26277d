"""A decode step's linear layers as one Triton kernel made for few rows (`EngineSettings.linear_kernel`).

A decode step multiplies a handful of rows (one per request in the batch) by every weight of the model, so its time
is the weights' bytes over the memory bandwidth. cuBLAS picks split-K kernels for these shapes: each product is
two kernels (the partial products, then their sum) and reads GLM's smaller weights at well under the bandwidth.
This kernel is one program per block of output features: it walks the whole input dimension, reading its block of
the weight once with all the rows (at most `row_limit`'s), and sums in float32 on the tensor cores. Steps with more
rows (most prefills) keep `torch.nn.functional.linear`.

Without Triton (or on another device, `triton_kernels.runs_on`) the engine keeps cuBLAS.
`TRITON_INTERPRET=1` runs the kernel on the CPU (slowly), which is how the tests check it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batch_engine.operators import define_operator
from batch_engine.triton_kernels import agrees, launch_options

if TYPE_CHECKING:
    import torch

MAX_ROWS = 16
"""The most rows (tokens of a step) the kernel takes of a product not in `ROW_LIMITS`; more go to cuBLAS. On an H200,
with one tiling for all, the kernel was 0.96–1.15 times cuBLAS's speed at 1 and 8 rows and behind it at 32 on two of
GLM's four shapes (0.76 and 0.84 times; `bench/RESULTS.md`)."""

ROW_LIMITS = {
    (4096, 4096): 32,
    (4096, 13696): 32,
}
"""(out features, in features) → the most rows the kernel takes of that product: GLM-4's output and down products,
where the H200 sweep found the kernel ahead of cuBLAS at 32 rows too, with the tilings of `TILINGS` (11.5 against
13.6 µs and 30.8 against 32.7; `bench/RESULTS.md`). A decode step at batch 17–32 and a follow-up's extend step of 32
tokens then take the kernel for these two: on an H100, a step at batch 32 went from 8.32 to 8.21 ms and the extend
step from 10.29 to 10.12 (there the output product was even with cuBLAS at 32 rows, the down product 1.05× ahead)."""


@dataclass(frozen=True)
class Tiling:
    """How the kernel cuts a product: output features and input lanes per step of a program, and Triton's warps and
    pipeline stages."""

    block_n: int = 64
    block_k: int = 256
    warps: int = 4
    stages: int = 5


TILING = Tiling()
"""The tiling of a product not in `TILINGS`, from `python -m bench.gpu_linear --sweep` on an H200 (bench/RESULTS.md):
at one row the best for GLM-4's q/k/v product and within 0.7 µs of the best for its output and down products."""

TILINGS = {
    (4096, 4096): Tiling(32, 256, 4, 5),
    (27392, 4096): Tiling(64, 256, 4, 3),
    (4096, 13696): Tiling(32, 256, 4, 5),
}
"""(out features, in features) → tiling: the same sweep's best at one row for GLM-4's (and GLM-4.6V-Flash's) output,
gate/up and down products."""

_KERNEL: Any = None
"""The Triton kernel (`batch_engine.linear_kernel`) once `load` has imported it."""


def load() -> Any:
    """The kernel, imported on first use, and the operator `batch_engine::skinny_linear` defined; `use_kernel` calls
    it before any layer is compiled."""
    global _KERNEL
    if _KERNEL is None:
        from batch_engine.linear_kernel import skinny_product

        define_operator(
            "skinny_linear",
            "(Tensor hidden, Tensor weight, Tensor? bias) -> Tensor",
            lambda hidden, weight, bias: skinny_linear(hidden.contiguous(), weight, bias),
            lambda hidden, weight, _: (hidden.shape[0], weight.shape[0]),
        )
        _KERNEL = skinny_product
    return _KERNEL


def skinny_linear(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, tiling: Tiling | None = None
) -> torch.Tensor:
    """`torch.nn.functional.linear(hidden, weight, bias)` through the kernel, for few rows of `hidden` (its leading
    dimensions flattened; the engine sends at most `row_limit`'s), `weight` (out, in) contiguous in its rows; cut as
    `tiling` says, by default as `TILINGS` gives for the weight's shape."""
    import torch

    *lead, depth = hidden.shape
    flat = hidden.reshape(-1, depth)
    rows, cols = flat.shape[0], weight.shape[0]
    tiling = tiling or tiling_for(cols, depth)
    assert flat.stride(-1) == weight.stride(-1) == 1, "the kernel reads each row's lanes in order"
    out = torch.empty((rows, cols), dtype=hidden.dtype, device=hidden.device)
    block_m = max(16, 1 << (rows - 1).bit_length())  # tensor-core products take at least 16 rows; spare ones masked
    (_KERNEL or load())[(-(-cols // tiling.block_n),)](
        flat, weight, weight if bias is None else bias, out, rows, cols, depth,
        flat.stride(0), weight.stride(0), out.stride(0),
        has_bias=bias is not None, block_m=block_m, block_n=tiling.block_n, block_k=tiling.block_k,
        even_k=depth % tiling.block_k == 0, precision="ieee" if hidden.dtype == torch.float32 else "tf32",
        num_warps=tiling.warps, num_stages=tiling.stages, **launch_options(hidden.device),
    )  # fmt: skip
    return out.view(*lead, cols)


def tiling_for(cols: int, depth: int) -> Tiling:
    """How the kernel cuts a product of `depth` input and `cols` output features."""
    return TILINGS.get((cols, depth), TILING)


def row_limit(cols: int, depth: int) -> int:
    """The most rows the kernel takes of a product of `depth` input and `cols` output features."""
    return ROW_LIMITS.get((cols, depth), MAX_ROWS)


def routed_linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`torch.nn.functional.linear`, through the kernel when `hidden` has at most `row_limit` rows (a decode step).
    The kernel is called as the operator `batch_engine::skinny_linear`, which `torch.compile` keeps as one opaque
    node: traced as a user-defined Triton kernel instead, the compiled layers ran slower than with cuBLAS."""
    import torch
    from torch.nn import functional

    if hidden.numel() > row_limit(weight.shape[0], hidden.shape[-1]) * hidden.shape[-1]:
        return functional.linear(hidden, weight, bias)
    if _KERNEL is None:
        load()
    *lead, depth = hidden.shape
    product: torch.Tensor = torch.ops.batch_engine.skinny_linear(hidden.reshape(-1, depth), weight, bias)
    return product.view(*lead, weight.shape[0])


def use_kernel(decoder: Any) -> int:
    """Route the linear layers of every layer of `decoder` (a transformers text model) through `routed_linear`: each
    `torch.nn.Linear` replaced by a `RoutedLinear` holding the same weights, and the fused q/k/v projections
    (`batch_engine.projections`) told to use it. How many products now take the kernel at decode steps."""
    import torch

    from batch_engine.projections import fused_class

    load()
    routed = 0
    for layer in decoder.layers:
        module: Any
        for name, module in list(layer.named_modules()):
            if isinstance(module, fused_class()):
                module.product = routed_linear
                routed += 1
            elif type(module) is torch.nn.Linear:
                parent_name, _, attribute = name.rpartition(".")
                setattr(layer.get_submodule(parent_name), attribute, _routed_class()(module))
                routed += 1
    return routed


def works_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel compiles and runs on `device` in `dtype` and agrees with `torch.nn.functional.linear` there
    (`linear_kernel` `auto`; `triton_kernels.agrees`), with each tiling at the most rows the engine gives it (`cases`):
    the memory a program needs grows with both, and a device with less of it than a variant needs keeps cuBLAS rather
    than failing when a step first takes that variant."""
    import torch

    checked = cases()
    generator = torch.Generator(device).manual_seed(0)
    hidden = torch.randn((max(rows for _, rows in checked), 1, 512), generator=generator, device=device)
    weight = torch.randn((200, 512), generator=generator, device=device) / 512**0.5
    bias = torch.randn(200, generator=generator, device=device)
    expected = torch.cat([torch.nn.functional.linear(hidden[:rows], weight, bias) for _, rows in checked])

    def run() -> torch.Tensor:
        inputs = (hidden.to(dtype), weight.to(dtype), bias.to(dtype))
        return torch.cat([skinny_linear(inputs[0][:rows], *inputs[1:], tiling) for tiling, rows in checked])

    # bfloat16 rounding of the inputs is about 0.02 here
    return agrees("the Triton linear kernel", "cuBLAS", run, expected, 0.1, f"{device} in {dtype}")


def cases() -> list[tuple[Tiling, int]]:
    """Each tiling the engine may use (`TILING`, `TILINGS`) with the most rows it may give it (`row_limit`)."""
    most = {TILING: MAX_ROWS}
    for cols, depth in {*TILINGS, *ROW_LIMITS}:
        tiling = tiling_for(cols, depth)
        most[tiling] = max(most.get(tiling, 0), row_limit(cols, depth))
    return sorted(most.items(), key=str)


@functools.cache
def _routed_class() -> type:
    """`RoutedLinear`, defined on first use so that importing this module does not import torch."""
    import torch

    class RoutedLinear(torch.nn.Module):
        """A `torch.nn.Linear`'s weights, multiplied by `routed_linear` (module docstring)."""

        def __init__(self, linear: Any) -> None:
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.weight, self.bias = linear.weight, linear.bias

        def forward(self, hidden: Any) -> Any:
            return routed_linear(hidden, self.weight, self.bias)

    return RoutedLinear
