"""A decode step's attention alone: the grouped matrix products, the Triton kernels as the engine ran them before
they were one operator, and the operator, side by side in one run.

    python -m bench.gpu_decode_attention [--span 1536] [--batches 1,8,32]   # on a GPU

The grouped products and the operator as the engine runs them (compiled), the earlier form as the compiled layers
ran it: its first kernel launched as a user-defined Triton kernel broke their graph, so the combine after it (torch
code) ran as eager kernels; here all of it runs eagerly (with today's first kernel, which reads the mask itself: the
earlier form also summed the mask into lengths, one more kernel, which this column leaves out). The same shapes
throughout: GLM-4's 32 query heads over 2 KV heads of 128, bfloat16, K and V read where the slots hold them, each row
at a length of 70–90 % of the span. Prints µs per call (40 calls, one per layer, captured in a CUDA graph as in a
decode step; CUDA events, median of 5 runs of 20 replays) and the largest difference of each from a float32
reference.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from collections.abc import Callable
from typing import Any

from bench.gpu_options import client_counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--span", type=int, default=1536)
    parser.add_argument("--batches", type=client_counts, default=(1, 8, 32))
    args = parser.parse_args()

    import torch

    from batch_engine import decode_attention
    from batch_engine.slots import _grouped_attention

    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    device, dtype, heads, kv_heads, dim, capacity = "cuda", torch.bfloat16, 32, 2, 128, args.span + 256
    decode_attention.load()
    paths = {
        "grouped products": torch.compile(_grouped_attention),
        "kernel, combine in torch (before)": split_then_combine_in_torch,
        "operator (kernels)": torch.compile(decode_attention.decode_attention),
    }
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; span {args.span}", file=sys.stderr)
    print(
        "| batch | " + " | ".join(f"{name}, µs" for name in paths) + " | before ÷ operator | max |diff| from float32 |"
    )
    print("| ---: | " + " | ".join("---:" for _ in paths) + " | ---: | ---: |")
    generator = torch.Generator(device).manual_seed(0)
    for batch in args.batches:
        keys = torch.randn((batch, kv_heads, capacity, dim), generator=generator, device=device, dtype=dtype)
        values = torch.randn((batch, kv_heads, capacity, dim), generator=generator, device=device, dtype=dtype)
        query = torch.randn((batch, heads, 1, dim), generator=generator, device=device, dtype=dtype)
        low, high = int(args.span * 0.7), int(args.span * 0.9)
        lengths = torch.randint(low, high, (batch,), generator=generator, device=device)
        mask = (torch.arange(args.span, device=device).view(1, -1) <= lengths.view(-1, 1)).view(batch, 1, 1, -1)
        key, value, scale = keys[:, :, : args.span], values[:, :, : args.span], dim**-0.5
        reference = _grouped_attention(query.float(), key.float(), value.float(), mask, scale)
        timings, errors = [], []
        for path in paths.values():
            with torch.inference_mode():
                out = path(query, key, value, mask, scale)
                errors.append(float((out.float() - reference).abs().max()))
                timings.append(replayed(functools.partial(path, query, key, value, mask, scale)))
        print(
            f"| {batch} | "
            + " | ".join(f"{t:.1f}" for t in timings)
            + f" | {timings[1] / timings[2]:.2f}× | "
            + ", ".join(f"{error:.4f}" for error in errors)
            + " |"
        )


def split_then_combine_in_torch(query: Any, key: Any, value: Any, mask: Any, scale: float) -> Any:
    """The decode attention as the compiled layers ran it before it was one operator: the first kernel, then the
    splits' combine as torch code run eagerly."""
    import torch

    from batch_engine.decode_attention import split

    batch, heads, _, dim = query.shape
    partial, maxima, sums = split(query, key, value, mask, scale)
    fades = torch.exp(maxima - maxima.amax(-1, keepdim=True))
    out = (partial * fades.unsqueeze(-1)).sum(2) / (sums * fades).sum(-1, keepdim=True)
    return out.to(query.dtype).view(batch, 1, heads, dim)


def replayed(call: Callable[[], object], layers: int = 40) -> float:
    """µs per call of `call`, `layers` calls captured in one CUDA graph as in a decode step (median of 5 runs of 20
    replays)."""
    import torch

    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(layers):
            call()
    runs = []
    for _ in range(5):
        begin = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        begin.record()
        for _ in range(20):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        runs.append(begin.elapsed_time(end) * 1000 / 20 / layers)
    return float(statistics.median(runs))


if __name__ == "__main__":
    main()
