"""What `scaled_dot_product_attention` costs the first time it meets a shape, per backend, against the calls after.

    python -m bench.gpu_sdpa_shapes [--lengths 1397,1398,1399,1400] [--repeats 5]   # on a GPU

PyTorch's cuDNN backend builds a cuDNN graph (operation graph, execution plans) for each new set of sizes and strides
and keeps it in a cache of the calling thread; flash and memory-efficient attention build nothing. The engine's text
prefills attend over each prompt's own length, and its vision encoder over each image's own patch count: each new
length is a first meeting. For each backend this times, with the device synchronised, the first call at each of
`--lengths` (new to the process; each backend's row 16 positions past the row before it) and the median of
`--repeats` calls after, on GLM-4.6V-Flash's shapes:

- text prefill: 32 query heads over 2 KV heads of 128, causal, bfloat16, K and V read from a slot of 8,192 positions
  (as the engine's slots hold them) and the queries in the layer's layout;
- the same with the queries a view of a longer tensor (`--riders` more positions after the prompt's, as a prefill
  with decoding rows riding along passes them): the same sizes, other strides;
- the same with K and V laid out as the queries are, positions outer (PyTorch's opt-in
  `TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1`, which plans per power of two of the lengths, takes only that layout);
- vision encoder: 12 heads of 128 over one image's patches, not causal.

With `TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1` in the environment, cuDNN's rows show what that opt-in saves.

Prints one table: first PyTorch's own pick (no backend forced), then each backend forced.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.gpu_options import client_counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=client_counts, default=(1397, 1398, 1399, 1400))
    parser.add_argument("--patches", type=client_counts, default=(5476, 5292, 4900))
    parser.add_argument("--riders", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    backends = {
        "PyTorch's pick": None,
        "cuDNN": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "memory-efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    cudnn = torch.backends.cudnn.version()  # type: ignore[no-untyped-call]
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; cuDNN {cudnn}", file=sys.stderr)
    print("| shape | backend | first call at a new length, ms (each) | later calls, ms (median) |")
    print("| --- | --- | ---: | ---: |")
    for shape, make in shapes(torch, args).items():
        for index, (name, backend) in enumerate(backends.items()):
            firsts, laters = [], []
            # each backend at lengths of its own (16 apart), so that no row meets what a row before it built; the
            # first, a length left out of the figures, loads the backend's kernels
            for size in (max(make.sizes) + 64 + 16 * index, *(size + 16 * index for size in make.sizes)):
                call = make(size)
                try:
                    with sdpa_kernel(backend) if backend else contextlib.nullcontext():
                        firsts.append(timed(torch, call))
                        laters.append(statistics.median(timed(torch, call) for _ in range(args.repeats)))
                except RuntimeError as error:  # the backend does not take this shape here
                    print(f"{shape}, {name}: {str(error).splitlines()[0]}", file=sys.stderr)
                    break
            else:
                first = ", ".join(f"{ms:.1f}" for ms in firsts[1:])
                print(f"| {shape} | {name} | {first} | {statistics.median(laters[1:]):.3f} |")


class Shape:
    """A call of one attention shape at each of `sizes` (`__call__` makes the call for one size)."""

    def __init__(self, sizes: tuple[int, ...], make: Callable[[int], Callable[[], Any]]) -> None:
        self.sizes, self._make = sizes, make

    def __call__(self, size: int) -> Callable[[], Any]:
        return self._make(size)


def shapes(torch: Any, args: argparse.Namespace) -> dict[str, Shape]:
    device, dtype, dim = "cuda", torch.bfloat16, 128
    attend = torch.nn.functional.scaled_dot_product_attention
    slot = (
        torch.randn((1, 2, 8192, dim), device=device, dtype=dtype),
        torch.randn((1, 2, 8192, dim), device=device, dtype=dtype),
    )

    def text(extra: int) -> Callable[[int], Callable[[], Any]]:
        def make(length: int) -> Callable[[], Any]:
            # the layer's layout: (1, length, heads, dim) in memory, seen as (1, heads, length, dim)
            query = torch.randn((1, length + extra, 32, dim), device=device, dtype=dtype).transpose(1, 2)[:, :, :length]
            key, value = slot[0][:, :, :length], slot[1][:, :, :length]
            return lambda: attend(query, key, value, is_causal=True, enable_gqa=True)

        return make

    def by_position(length: int) -> Callable[[], Any]:
        # K and V laid out as the queries are, positions outer (not as the engine's slots hold them)
        query = torch.randn((1, length, 32, dim), device=device, dtype=dtype).transpose(1, 2)
        key, value = (torch.randn((1, length, 2, dim), device=device, dtype=dtype).transpose(1, 2) for _ in "kv")
        return lambda: attend(query, key, value, is_causal=True, enable_gqa=True)

    def vision(patches: int) -> Callable[[], Any]:
        query, key, value = (
            torch.randn((1, patches, 12, dim), device=device, dtype=dtype).transpose(1, 2) for _ in "qkv"
        )
        return lambda: attend(query, key, value)

    return {
        "text prefill": Shape(args.lengths, text(0)),
        f"text prefill, queries a view ({args.riders} more positions)": Shape(args.lengths, text(args.riders)),
        "text prefill, K and V positions outer": Shape(args.lengths, by_position),
        "vision encoder": Shape(args.patches, vision),
    }


def timed(torch: Any, call: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    call()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1000


if __name__ == "__main__":
    main()
