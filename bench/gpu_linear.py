"""A decode step's linear layers alone: cuBLAS (`torch.nn.functional.linear`) against the engine's Triton kernel for
few rows (`batch_engine.skinny_linear`), side by side in one run.

    python -m bench.gpu_linear [--batches 1,8,32] [--sweep]   # on a GPU

GLM-4's four products of a decoder layer (query/key/value fused with its bias, output, gate/up, down), bfloat16,
40 distinct weights each (one per layer: the same weight again would be read from the L2 cache), the 40 calls
captured in one CUDA graph as in a decode step. Prints µs per call (median of 5 runs of 20 replays), the bandwidth
each reaches, and the largest difference of each from a float32 product. `--sweep` times every tiling of a small
grid for each shape and batch and prints the best ones (how `skinny_linear.TILING` and `TILINGS` were chosen).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from typing import Any

from bench.gpu_decode_attention import replayed
from bench.gpu_options import client_counts

SHAPES = (("qkv_proj", 4096, 4608, True), ("o_proj", 4096, 4096, False), ("gate_up_proj", 4096, 27392, False),
          ("down_proj", 13696, 4096, False))  # fmt: skip
"""(name, in features, out features, bias) of GLM-4-9B's and GLM-4.6V-Flash's decoder layers."""
LAYERS = 40


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=client_counts, default=(1, 8, 32))
    parser.add_argument("--sweep", action="store_true", help="time a grid of tilings too, print the best per shape")
    args = parser.parse_args()

    import torch

    from batch_engine.skinny_linear import TILING, TILINGS, skinny_linear

    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    print(
        f"{torch.cuda.get_device_name()}; torch {torch.__version__}; tilings {TILINGS}, else {TILING}", file=sys.stderr
    )
    print("| product | batch | cuBLAS, µs | kernel, µs | ratio | cuBLAS, kernel GB/s | max |diff| (cuBLAS, kernel) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    generator = torch.Generator("cuda").manual_seed(0)
    best: list[str] = []
    for name, depth, cols, has_bias in SHAPES:
        weights = [
            torch.randn((cols, depth), generator=generator, device="cuda", dtype=torch.bfloat16) * depth**-0.5
            for _ in range(LAYERS)
        ]
        biases = [torch.randn(cols, generator=generator, device="cuda", dtype=torch.bfloat16) if has_bias else None
                  for _ in range(LAYERS)]  # fmt: skip
        gigabytes = cols * depth * 2 / 1e9
        for batch in args.batches:
            hidden = torch.randn((batch, 1, depth), generator=generator, device="cuda", dtype=torch.bfloat16)
            reference = torch.nn.functional.linear(
                hidden.float(), weights[0].float(), None if biases[0] is None else biases[0].float()
            )
            paths: dict[str, Any] = {"cuBLAS": torch.nn.functional.linear, "kernel": skinny_linear}
            timings, errors = [], []
            for path in paths.values():
                with torch.inference_mode():
                    errors.append(float((path(hidden, weights[0], biases[0]).float() - reference).abs().max()))
                    timings.append(replayed(cycling(path, hidden, weights, biases), LAYERS))
            print(
                f"| {name} | {batch} | {timings[0]:.1f} | {timings[1]:.1f} | {timings[0] / timings[1]:.2f}× | "
                f"{gigabytes / timings[0] * 1e6:.0f}, {gigabytes / timings[1] * 1e6:.0f} | "
                f"{errors[0]:.4f}, {errors[1]:.4f} |",
                flush=True,
            )
            if args.sweep and batch in (1, 32):
                best.append(f"{name}, batch {batch}: {swept(hidden, weights, biases)}")
                print(best[-1], file=sys.stderr, flush=True)
            del hidden
        del weights, biases
    for line in best:
        print(line)


def cycling(path: Any, hidden: Any, weights: list[Any], biases: list[Any]) -> Any:
    """A call of `path` that takes the next layer's weight each time (as a decode step does)."""
    layer = itertools.cycle(range(LAYERS))

    def call() -> Any:
        index = next(layer)
        return path(hidden, weights[index], biases[index])

    return call


def swept(hidden: Any, weights: list[Any], biases: list[Any]) -> str:
    """The three fastest tilings of a small grid for this shape, µs per call."""
    import torch

    from batch_engine.skinny_linear import Tiling, skinny_linear

    timed = []
    for block_n, block_k, (warps, stages) in itertools.product((16, 32, 64), (128, 256), ((4, 3), (4, 5))):
        tiling = Tiling(block_n, block_k, warps, stages)
        try:
            with torch.inference_mode():

                def path(h: Any, w: Any, b: Any, tiling: Tiling = tiling) -> Any:
                    return skinny_linear(h, w, b, tiling)

                timed.append((replayed(cycling(path, hidden, weights, biases), LAYERS), tiling))
        except Exception as error:  # a tiling too large for the device's shared memory: skip it
            print(f"{tiling}: {type(error).__name__}", file=sys.stderr)
    timed.sort(key=lambda pair: pair[0])
    return "; ".join(f"{t:.1f} µs {tiling}" for t, tiling in timed[:3])


if __name__ == "__main__":
    main()
