"""The batching engine's settings (`EngineSettings`, validated), and how the orchestrator's `vision` and
`reasoning` settings and both stages' command lines name them (`EngineOptions`, read by `engine_settings`;
`add_engine_arguments` adds the command-line options)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class EngineSettings:
    slots: int = 16
    """Requests decoded together at most."""
    max_tokens: int = 8192
    """Prompt plus answer per request at most (each slot's length)."""
    queue_size: int = 64
    """Requests waiting for a slot at most; beyond that `submit` refuses."""
    prefill_tokens: int = 8192
    """Prompt tokens prefilled per step at most (one request is always admitted, however long)."""
    prefix_bytes: int = 4 << 30
    """Bytes of prompt-prefix KV kept for follow-ups (an image's prompt up to the image, a text in blocks)."""
    encoder_bytes: int = 512 << 20
    """Bytes of vision-encoder output kept."""
    cuda_graphs: bool = True
    """Capture decode steps, follow-up extend steps and (`prefill_graphs`) prefills as CUDA graphs (on a CUDA device
    only)."""
    prefill_graphs: bool | None = None
    """Pad each prefill from position 0 to its length bucket (`batch_engine.graphs.padded_length`: a multiple of 128
    up to 2,048 tokens, coarser beyond, an eighth more at most past 1,024), so that with `cuda_graphs` one CUDA graph
    per bucket, captured at start, replays its text model's forward: the host then issues one launch where it runs
    forty layers' Python and launches. The vision encoder before it is replayed as a CUDA graph of its image's grid
    from that grid's second meeting on (`batch_engine.encoder_graphs`, at most 8 grids kept). None
    (`auto`, the default): on where the host launches slowly (`batch_engine.host`: measured at start on a CUDA device,
    and logged, with a warning where it is slow and this is off; slow from 6.5 µs a launch). With GLM-4.6V-Flash, on an
    H100 whose host kept up (5.9–6.0 µs) they took a lone first token from 66.7 to 67.8 ms; on slow hosts (readings of
    7.6–12.8 µs) from 122.2 to 77.5 on an H100 and from 73.5 to 64.6 on an H200 (p50s, in turns). On a third slow host
    (an H100) 32 clients got the same tokens/s with them as without (1,749.7 against 1,747.7); on the H200 the engine
    reserved 23.3 GiB at start with them and without (`bench/gpu_prefill_graphs.py`, `bench/gpu_vision.py
    --compare-prefill-graphs`, `bench/RESULTS.md`). The start captures a graph per bucket (14 more with slots of 1,717
    tokens); what that adds to the start's time is not measured apart. The text model of the `local` reasoning
    backend takes the same path, not measured on a GPU. On a CPU nothing is captured and the padded prefill runs
    eagerly, as the tests run it."""
    stop_loops: bool = True
    """End an answer once it loops (`stage_protocol.loops`), as the `glm` backend's plain `generate` does."""
    compile: bool | None = None
    """`torch.compile` the text model's decoder layers (dynamic shapes; one compilation serves every layer) and an
    image model's vision encoder blocks: fuses the many small kernels of a decode step and of the encoder, at about
    a minute more to start on a GPU. None: on a CUDA device."""
    compile_shapes: str = "automatic"
    """How the compiled decoder layers treat sizes: `automatic`, dynamo's automatic dynamic shapes: compiled for the
    sizes first seen, then again with only the sizes that changed symbolic, so the model's own sizes (hidden, heads,
    rotary) stay constants in the generated code; `dynamic`, every size symbolic from the first call (one compilation
    per kind of step). `automatic` compiles more, and a step of a kind seen at one size only compiles again at its
    next size: the engine's start prefills two lengths of each kind for it (one of each under `dynamic`:
    `batch_engine.compiling.warm_prefills`), and the decode and extend steps meet theirs as their graphs are
    captured. On an H200 it took GLM-4.6V-Flash's text prefill of 1,397 tokens from 41.9 to 38.9 ms, and its first
    token from 68.7 to 65.7 ms (`bench/RESULTS.md`). The vision encoder's blocks compile with dynamic shapes either
    way (one compilation for every image size)."""
    fuse_projections: bool = True
    """Each attention layer's query, key and value projections as one matrix product (`batch_engine.projections`;
    the weights concatenated once at start, in the model itself, so plain `generate` on it runs them so too)."""
    overlap: bool = True
    """Launch each decode step before reading the tokens of the one before, so that the device does not wait for the
    host's handling of them between steps (on a GPU; elsewhere the steps run as they are called either way). A
    request that finishes at one step has had one more computed, and dropped."""
    ride_along: bool = False
    """The rows already decoding decode their next token inside a prefill's own forward (one from position 0),
    instead of in a decode step of their own after it: to a compute-bound prompt of a thousand tokens a few more
    rows add little, where a decode step reads every weight again. Off by default: with 32 clients on H100s it gained
    2.5–2.7 % in two runs and lost 5.0 % in a third, on another machine, where its prefill steps were uneven (77–108
    ms against 76–83 without riders; why is not established), and 1.5 % in a fourth, with cuDNN's plans per power of
    two, its steps even, where the decode step launched with each prefill seemed mostly to overlap it, leaving
    riding little to save (`bench/RESULTS.md`)."""
    dependent_launch: bool | None = None
    """Launch the engine's Triton kernels and the compiled layers' kernels with programmatic dependent launch
    (`triton_kernels.dependent_launch`): each such kernel is started while the one before it is still finishing and
    waits inside for its results, so that the gaps between the many small kernels of a graph-captured decode step
    shrink. None: on a CUDA device of compute capability 9.0 or later (Hopper's `griddepcontrol`) where Triton is
    installed. Process-wide once on. On an H100 it took GLM-4.6V-Flash's decode step at batch 1 from 7.26 to 7.04 ms,
    at batch 8 from 7.52 to 7.26; in a short run on another (one sample each), prefill steps took 72.8 ms each with
    it and 75.0 without (`bench/RESULTS.md`)."""
    attention_plans: str = "power-of-two"
    """How cuDNN's attention plans its kernels (`batch_engine.attention_plans`): `power-of-two`, one plan per power of
    two of the lengths, every one built at start (PyTorch's `TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1`, which the `glm` and
    `local` backends set for the process before their model's first attention, unless the environment sets it either
    way); `length`, PyTorch's default, a plan at each new prompt length and image grid, built by the request that
    brings it (about 36–64 ms each on H100s). On H100s a first token at a prompt length not met before took
    70.9–75.3 ms against 101.2–108.3, at a length met before 69.4–71.5 against 66.2–68.9, and 32 clients were
    0.5–2.3 % slower (`bench/RESULTS.md`)."""
    recurring_plans: bool = True
    """With `attention_plans` `power-of-two`, an attention call met in two prefills at the same sizes (a prompt
    length, an image grid) gets a plan of its own, per length, built once the engine has idled a quarter second; such
    calls then skip the copies into the layout the plans per power of two need and take the cheaper kernels
    (`attention_plans.RecurringCalls`). On three H100s, 32 clients 2.0–3.5 % faster, a lone first token 2.9–9.5 ms
    sooner; on another, whose steps drifted within the run, that first token 8.1 ms later (`bench/RESULTS.md`)."""
    decode_kernel: bool | None = None
    """A decode step's attention as Triton kernels (`batch_engine.decode_attention`) instead of the grouped matrix
    products. None: on a CUDA device where Triton is installed and a check at start (`works_on`) finds it agreeing
    with the grouped products."""
    linear_kernel: bool | None = None
    """A decode step's linear layers through one Triton kernel made for few rows (`batch_engine.skinny_linear`)
    instead of cuBLAS's split-K products. None: on a CUDA device where Triton is installed and a check at start
    (`works_on`) finds it agreeing with cuBLAS. On an H100 it took GLM-4.6V-Flash's graph-captured decode step at
    batch 1 from 8.64 to 8.43 ms, at batch 8 from 9.17 to 8.95 (`bench/RESULTS.md`)."""

    def __post_init__(self) -> None:
        bounds = (
            ("slots", self.slots, 1, 128),
            ("max_tokens", self.max_tokens, 256, None),
            ("queue_size", self.queue_size, 1, None),
            ("prefill_tokens", self.prefill_tokens, 1, None),
            ("prefix_bytes", self.prefix_bytes, 0, None),
            ("encoder_bytes", self.encoder_bytes, 0, None),
        )
        if self.compile_shapes not in COMPILE_SHAPES:
            shapes = self.compile_shapes
            raise ValueError(f"the batching engine's compile_shapes must be automatic or dynamic, not {shapes!r}")
        if self.attention_plans not in ATTENTION_PLANS:
            plans = self.attention_plans
            raise ValueError(f"the batching engine's attention_plans must be power-of-two or length, not {plans!r}")
        for name, value, low, high in bounds:
            if value < low or (high is not None and value > high):
                within = f"from {low} to {high}" if high is not None else f"at least {low}"
                raise ValueError(f"the batching engine's {name} must be {within}, not {value}")


class EngineOptions(Protocol):
    """The engine's options as the orchestrator's settings (`ORCH_VISION__ENGINE…`, `ORCH_REASONING__ENGINE…`) and
    the stages' command lines (`--engine…`) name them."""

    @property
    def engine(self) -> str: ...  # `batched` or `generate`
    @property
    def engine_slots(self) -> int: ...
    @property
    def engine_max_tokens(self) -> int: ...
    @property
    def engine_queue(self) -> int: ...
    @property
    def engine_prefix_mb(self) -> int: ...
    @property
    def engine_cuda_graphs(self) -> bool: ...
    @property
    def engine_compile(self) -> str: ...  # `auto`, `on` or `off`
    @property
    def engine_prefill_tokens(self) -> int: ...
    @property
    def engine_decode_kernel(self) -> str: ...  # `auto`, `on` or `off`
    @property
    def engine_compile_shapes(self) -> str: ...  # `automatic` or `dynamic`
    @property
    def engine_linear_kernel(self) -> str: ...  # `auto`, `on` or `off`
    @property
    def engine_attention_plans(self) -> str: ...  # `power-of-two` or `length`
    @property
    def engine_recurring_plans(self) -> bool: ...
    @property
    def engine_dependent_launch(self) -> str: ...  # `auto`, `on` or `off`
    @property
    def engine_prefill_graphs(self) -> str: ...  # `auto`, `on` or `off`


def engine_settings(options: EngineOptions) -> EngineSettings | None:
    """The batching engine's settings from `options`; None for plain `generate`."""
    if options.engine == "generate":
        return None
    return EngineSettings(
        slots=options.engine_slots,
        max_tokens=options.engine_max_tokens,
        queue_size=options.engine_queue,
        prefix_bytes=options.engine_prefix_mb << 20,
        cuda_graphs=options.engine_cuda_graphs,
        compile=SWITCH[options.engine_compile],
        prefill_tokens=options.engine_prefill_tokens,
        decode_kernel=SWITCH[options.engine_decode_kernel],
        compile_shapes=options.engine_compile_shapes,
        linear_kernel=SWITCH[options.engine_linear_kernel],
        attention_plans=options.engine_attention_plans,
        recurring_plans=options.engine_recurring_plans,
        dependent_launch=SWITCH[options.engine_dependent_launch],
        prefill_graphs=SWITCH[options.engine_prefill_graphs],
    )


SWITCH: dict[str, bool | None] = {"auto": None, "on": True, "off": False}
"""An `auto`/`on`/`off` option as a setting (None: decided by the device)."""
COMPILE_SHAPES = ("automatic", "dynamic")
"""The values of `EngineSettings.compile_shapes`, its default first."""
ATTENTION_PLANS = ("power-of-two", "length")
"""The values of `EngineSettings.attention_plans`, its default first."""


def add_engine_arguments(parser: argparse.ArgumentParser, *, default: str, prefix_mb: int) -> None:
    """The engine's options (`--engine`, `--engine-…`), `default` being `batched` or `generate`, and `prefix_mb`
    the default of `--engine-prefix-mb`."""
    parser.add_argument(
        "--engine",
        choices=("batched", "generate"),
        default=default,
        help=f"the batching engine, or plain generate one request at a time (default: {default})",
    )
    parser.add_argument(
        "--engine-slots", type=count(1, 128), default=16, help="batched: requests at once (default: 16)"
    )
    parser.add_argument(
        "--engine-max-tokens",
        type=count(256),
        default=8192,
        help="batched: prompt + answer per request (default: 8192)",
    )
    parser.add_argument("--engine-queue", type=count(1), default=64, help="batched: requests waiting (default: 64)")
    parser.add_argument(
        "--engine-prefix-mb",
        type=count(0),
        default=prefix_mb,
        help=f"batched: MiB of prompt-prefix KV kept (default: {prefix_mb})",
    )
    parser.add_argument(
        "--no-cuda-graphs", dest="engine_cuda_graphs", action="store_false", help="batched: no CUDA graphs"
    )
    parser.add_argument(
        "--engine-prefill-tokens", type=count(1), default=8192, help="batched: prompt tokens per step (default: 8192)"
    )
    parser.add_argument(
        "--engine-compile", choices=tuple(SWITCH), default="auto", help="batched: compile (default: on a GPU)"
    )
    parser.add_argument(
        "--engine-prefill-graphs",
        choices=tuple(SWITCH),
        default="auto",
        help="batched: prefills replayed as CUDA graphs (default: auto, where the host launches slowly)",
    )
    add_kernel_arguments(parser, "--engine-", "batched: ")


def add_kernel_arguments(parser: argparse.ArgumentParser, prefix: str, context: str = "") -> None:
    """The options that choose the engine's kernels and how its layers compile, named `prefix` + `decode-kernel`,
    `linear-kernel`, `compile-shapes`, `attention-plans`, `recurring-plans`, `dependent-launch` (the stages'
    `--engine-…`, the GPU benchmarks' own), with the engine's defaults."""
    parser.add_argument(
        f"{prefix}decode-kernel",
        choices=tuple(SWITCH),
        default="auto",
        help=f"{context}decode attention as one Triton kernel (default: on a GPU with Triton)",
    )
    parser.add_argument(
        f"{prefix}linear-kernel",
        choices=tuple(SWITCH),
        default="auto",
        help=f"{context}decode steps' linear layers through a Triton kernel (default: on a GPU with Triton)",
    )
    parser.add_argument(
        f"{prefix}compile-shapes",
        choices=COMPILE_SHAPES,
        default=COMPILE_SHAPES[0],
        help=f"{context}with compiled layers, how they treat sizes (default: {COMPILE_SHAPES[0]})",
    )
    parser.add_argument(
        f"{prefix}attention-plans",
        choices=ATTENTION_PLANS,
        default=ATTENTION_PLANS[0],
        help=f"{context}cuDNN's attention plans: one per power of two of the lengths, built at start, or one at each "
        f"new length, as PyTorch has it (default: {ATTENTION_PLANS[0]})",
    )
    parser.add_argument(
        f"{prefix}recurring-plans",
        type=on_off,
        default=True,
        metavar="{on,off}",
        help=f"{context}with plans per power of two, an attention call met in two prefills gets a plan of its own, "
        "built while the engine idles (default: on)",
    )
    parser.add_argument(
        f"{prefix}dependent-launch",
        choices=tuple(SWITCH),
        default="auto",
        help=f"{context}kernels launched with programmatic dependent launch (default: on a GPU of compute capability "
        "9.0 or later)",
    )


def on_off(text: str) -> bool:
    """An argparse type: `on` or `off`."""
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"{text!r} is not on or off")
    return text == "on"


def count(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer from `low` (to `high`)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"{value} is not " + (f"from {low} to {high}" if high is not None else f">= {low}")
            )
        return value

    return parse
