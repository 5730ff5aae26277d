"""The command-line options the GPU benchmarks share (`bench/gpu_vision.py`, `bench/gpu_text.py`, and `--clients` of
`bench/gpu_decode_attention.py`), and the engine's settings they give."""

from __future__ import annotations

import argparse
from typing import Any

from batch_engine.attention_plans import plan_by_power_of_two
from batch_engine.settings import SWITCH, add_kernel_arguments, on_off
from bench.gpu_load import COMPARED


def arguments(description: str | None, *, device_memory: str) -> argparse.ArgumentParser:
    """The options both benchmarks take; each adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU: proves the code path")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--answer-tokens", type=int, default=256)
    parser.add_argument(
        "--clients", type=client_counts, default=(8, 32), help="concurrent clients, comma-separated (default: 8,32)"
    )
    parser.add_argument("--compile", action="store_true", help="the engine with compiled decoder layers")
    add_kernel_arguments(parser, "--")
    parser.add_argument(
        "--fuse-projections",
        type=on_off,
        default=True,
        metavar="{on,off}",
        help="each attention layer's q/k/v projections as one product (default: on, as the engine's default)",
    )
    parser.add_argument(
        "--prefill-graphs",
        choices=tuple(SWITCH),
        default="auto",
        help="prefills padded to their length bucket and replayed as CUDA graphs; auto: where the host launches "
        "slowly (default: auto, as the engine's default; on where they are compared; bench/gpu_prefill_graphs.py "
        "compares the two for a lone request)",
    )
    parser.add_argument("--profile", action="store_true", help="after the run, the device's kernels in decode steps")
    for setting, what in COMPARED.items():
        parser.add_argument(
            f"--compare-{setting.replace('_', '-')}",
            dest="compare",
            action="append_const",
            const=setting,
            default=[],
            help=f"after the run, one request's first token and decode and the largest load with {what} off, on, on, "
            "off",
        )
    parser.add_argument(
        "--no-cudnn-attention",
        action="store_true",
        help="PyTorch's attention without its cuDNN backend, for everything the run does (plain generate too): cuDNN "
        "builds a plan at each new length (bench/gpu_sdpa_shapes.py)",
    )
    parser.add_argument(
        "--check-float32", action="store_true", help="after the run, compare 32 tokens with plain generate in float32"
    )
    parser.add_argument(
        "--heap",
        choices=("frozen", "as-loaded"),
        default="frozen",
        help="the measures with what the process holds once the engine is up kept out of the garbage collector's "
        "walks, as the service keeps it (`stage_protocol.server.collector`), or given to it (default: frozen)",
    )
    parser.add_argument(
        "--replays-only",
        action="store_true",
        help="only the agreement check and the graph replays: two engines compared in the time of one start each",
    )
    parser.set_defaults(device_memory=device_memory)
    return parser


def parsed(
    description: str | None, *, device_memory: str, size: str, default: int
) -> tuple[argparse.Namespace, int, int]:
    """Both benchmarks' options (`arguments`) and the one that sizes each prompt (`size`: the prompt's tokens, the
    image's side; `default` unless given), parsed and checked against the device (`check_device`); with the size and
    the answer's budget to run: with `--tiny`, a size of 64 and at most 16 answer tokens."""
    parser = arguments(description, device_memory=device_memory)
    sized = parser.add_argument(size, type=int, default=default)
    args = parser.parse_args()
    check_device(parser, args)
    if "prefill_graphs" in args.compare and args.prefill_graphs == "off":
        parser.error("--compare-prefill-graphs starts the engine with the prefills' graphs captured: not with off")
    if args.no_cudnn_attention:
        import torch

        torch.backends.cuda.enable_cudnn_sdp(False)
    if args.attention_plans == "power-of-two":  # for the whole run, set before plain generate's first attention
        plan_by_power_of_two()
    if args.tiny:
        return args, 64, min(args.answer_tokens, 16)
    return args, int(getattr(args, sized.dest)), args.answer_tokens


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine's keywords of both benchmarks' `build` from their options: a slot per client of the largest load,
    compiled layers (`--compile`), the decode attention (`--decode-kernel`), the linear layers (`--linear-kernel`), the
    fused projections, programmatic dependent launch (`--dependent-launch`), the prefills' graphs (`--prefill-graphs`);
    ride-along and the prefills' graphs on when they are to be compared (`--compare-ride-along`: the engine's start
    warms its prefills only when it is on; `--compare-prefill-graphs`: it captures the prefills' graphs only then)."""
    return {
        "slots": max(args.clients),
        "compile_layers": args.compile,
        "decode_kernel": SWITCH[args.decode_kernel],
        "fuse_projections": args.fuse_projections,
        "compile_shapes": args.compile_shapes,
        "linear_kernel": SWITCH[args.linear_kernel],
        "ride_along": "ride_along" in args.compare,
        "recurring_plans": args.recurring_plans,
        "dependent_launch": SWITCH[args.dependent_launch],
        "prefill_graphs": True if "prefill_graphs" in args.compare else SWITCH[args.prefill_graphs],
    }


def client_counts(text: str) -> tuple[int, ...]:
    """`--clients`: comma-separated counts, each at least 1."""
    try:
        counts = tuple(int(n) for n in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of counts") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every count must be at least 1")
    return counts


def check_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    import torch

    if not args.tiny and not torch.cuda.is_available():
        parser.error(
            f"the full-size model needs a CUDA GPU (about {args.device_memory}); use --tiny to check the code path "
            "on a CPU"
        )
