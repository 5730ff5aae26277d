"""Parts of the batching engine's steps measured apart, each against what it replaced or might, in one run.

    python bench/gpu_parts.py [--rounds 5] [--image-side 1024] [--profile]      # on the GPU machine
    python bench/gpu_parts.py --tiny                                            # the same code on a CPU

- The vision encoder of GLM-4.6V-Flash (full architecture, random weights, bfloat16) on one image, as transformers
  runs it (eagerly, `sdpa`) against, first, its blocks and position embeddings compiled as the engine compiles them
  (`batch_engine.compiling.compile_model`) under `sdpa`, then the same with the engine's packed attention
  (`batch_engine.vision_attention`) traced with the head count symbolic (the engine thread's own dynamo settings),
  then with the model's ints constant (`compiling.trace_with_constant_ints`), then with its patch embedding and merge as
  matrix products (`batch_engine.convolutions`), as the engine runs it: ms per image (p50, the device synchronised),
  and the largest difference between transformers' output and the engine's.
- Each attention layer's query, key and value projections of GLM-4-9B's shape (4096 → 4096, 256, 256, with biases;
  40 layers) at 1, 8 and 32 rows, as three products and fused into one (`batch_engine.projections`) on the same
  weights: all 40 layers captured in one CUDA graph on a GPU, as in a decode step (eagerly on a CPU).
- The image processor on the same image, on the CPU and on the GPU (as the `glm` backend runs it on a GPU).
- The text prefill of the encoder's prompt through one decoder layer's code forty times, compiled with every size
  symbolic and every int on a module (so that one compilation serves all forty layer indices: `compile_shapes`
  `dynamic`), with those ints specialised, and with automatic dynamic shapes (`automatic`, the engine's default):
  what the symbolic sizes cost (a note line).

`--tiny` runs a 2-layer model's encoder and small projections on the CPU: it proves the code path, measures nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `bench`, `tests` and the engine importable
    sys.path.insert(0, str(ROOT))

from bench.gpu_vision import Bench  # noqa: E402

Row = tuple[str, float, float]


def timed(device: str, rounds: int, work: Callable[[], Any]) -> float:
    """Milliseconds per call of `work` (p50 of `rounds`, after one warm-up), the device synchronised around each."""
    import torch

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    work()
    sync()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        work()
        sync()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def load(tiny: bool) -> tuple[Any, Any, str]:
    """The model, its processor and its device: the full-size GLM-4.6V-Flash on a GPU, or the tiny one on the CPU."""
    import torch

    from tests.tiny_glm4v import full_size_glm46v_flash, glm_processor, glm_tokenizer, tiny_glm4v_model

    torch.manual_seed(0)
    if tiny:
        tokenizer = glm_tokenizer()
        return tiny_glm4v_model(tokenizer).eval(), glm_processor(tokenizer, max_visual_tokens=256), "cpu"
    return (*full_size_glm46v_flash("cuda", torch.bfloat16), "cuda")


def encoder(
    model: Any, processor: Any, device: str, side: int, rounds: int, profile: bool = False
) -> tuple[list[Row], str, int]:
    """The encoder's rows and note, and the prompt's length in tokens."""
    import torch

    from batch_engine.compiling import compile_model, trace_with_constant_ints
    from batch_engine.convolutions import products_for_convolutions
    from batch_engine.vision_attention import register_vision_attention

    inputs = Bench(model, None, device, processor=processor, side=side).prompt(0)
    grid = inputs["image_grid_thw"]
    pixels, longest = inputs["pixel_values"].to(device), int((grid[:, 1] * grid[:, 2]).max())
    grid = grid.to(device)

    def encode() -> Any:
        features = model.model.get_image_features(pixels, image_grid_thw=grid, max_seqlen=longest, return_dict=True)
        return features.pooler_output[0]

    with torch.inference_mode():
        plain_out = encode()
        plain = timed(device, rounds, encode)
        compile_model(model, model.model.language_model)  # under sdpa: the engine before its packed attention
        visual = model.model.visual
        del visual.forward  # `compile_model`'s `trace_with_constant_ints`: first as the thread's own settings trace it
        sdpa = timed(device, rounds, encode)
        register_vision_attention(model)  # the compiled blocks' guards see the change and compile again
        encode()
        symbolic = timed(device, rounds, encode)
        torch._dynamo.reset()  # else the blocks' code for symbolic ints, whose guards hold, would serve on
        trace_with_constant_ints(visual)  # as the engine runs it
        started = time.perf_counter()
        encode()
        compiling = time.perf_counter() - started
        constant = timed(device, rounds, encode)
        products_for_convolutions(model)  # outside the compiled blocks: nothing compiles again
        engine_out = encode()
        engine = timed(device, rounds, encode)
        if profile:
            kernels(encode)
    difference = float((engine_out.float() - plain_out.float()).abs().max())
    _, height, width = (int(n) for n in grid[0].tolist())
    note = (
        f"encoder: {height}×{width} patches; compiling its blocks as the engine does took {compiling:.1f} s "
        f"(the first image); largest difference between the engine's output and transformers' {difference:.3g} "
        f"(outputs' largest magnitude {float(plain_out.float().abs().max()):.3g})"
    )
    encoder = f"vision encoder, {side}×{side} image, ms:"
    rows = [
        (f"{encoder} compiled under sdpa (the engine before)", plain, sdpa),
        (f"{encoder} packed attention, compiled, heads symbolic (the engine before)", plain, symbolic),
        (f"{encoder} packed attention, compiled, the model's ints constant", plain, constant),
        (f"{encoder} … and its whole-kernel convolutions as products (the engine)", plain, engine),
    ]
    return rows, note, int(inputs["input_ids"].shape[1])


def text_layer(model: Any, device: str, rounds: int, tokens: int) -> str:
    """What the decoder layers' compiled sizes cost a prefill: one layer's code (fused q/k/v) over `tokens` tokens,
    forty times (a model's worth), compiled three ways: as `compile_model` compiles it under
    `EngineSettings.compile_shapes` `dynamic` (dynamic shapes, every int of a module an input so that one compilation
    serves every layer index); with the modules' ints specialised (in the engine, one compilation per layer index;
    here one, the same layer running every time); and under `automatic`, the engine's default, after a call with
    fewer tokens, so that the code timed has the token count symbolic and the model's own sizes constant, as a
    service runs it."""
    import torch

    from batch_engine.projections import fuse_projections

    text = model.model.language_model
    fuse_projections(text)
    layer = text.layers[0]

    def forty(count: int) -> Callable[[], None]:
        generator = torch.Generator(device).manual_seed(2)
        hidden = torch.randn(1, count, text.config.hidden_size, device=device, dtype=model.dtype, generator=generator)
        positions = torch.arange(count, device=device).view(1, 1, count).expand(3, 1, count)
        rotary = text.rotary_emb(hidden, positions)

        def run() -> None:
            for _ in range(40):
                layer(hidden, position_embeddings=rotary, attention_mask=None, position_ids=positions)

        return run

    times = {}
    with torch.inference_mode():
        for way, ints_symbolic, dynamic in (("dynamic", True, True), ("ints", False, True), ("automatic", True, None)):
            torch._dynamo.reset()
            torch._dynamo.config.allow_unspec_int_on_nn_module = ints_symbolic
            layer.compile(dynamic=dynamic)
            if dynamic is None:
                forty(max(1, tokens - 7))()  # a first size, so that the timed one compiles with the count symbolic
            times[way] = timed(device, rounds, forty(tokens))
    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    return (
        f"text prefill, one decoder layer's code ×40 over {tokens} tokens: {times['dynamic']:.2f} ms compiled with "
        f"dynamic shapes and the module ints symbolic (`compile_shapes` `dynamic`), {times['ints']:.2f} ms with the "
        f"ints specialised, {times['automatic']:.2f} ms with automatic dynamic shapes (`automatic`, the engine's "
        "default)"
    )


def processing(processor: Any, device: str, side: int, rounds: int) -> Row:
    """The processor on one image (chat template, resizing, patches), on the CPU and then on `device`, as the `glm`
    backend's codec runs it there (`vision_stage.glm_codec.image_device`); the device synchronised."""
    from bench.gpu_vision import chat_kwargs, noise
    from vision_stage.glm_codec import chat_messages
    from vision_stage.prompts import task_prompt

    messages = chat_messages(noise(side, 7), task_prompt("answer", "What is written?"))
    kwargs, placed = chat_kwargs(processor), chat_kwargs(processor, device)

    def on(arguments: dict[str, Any]) -> Callable[[], Any]:
        return lambda: processor.apply_chat_template(messages, **arguments)

    label = f"image processor, {side}×{side} image, ms: on the CPU, then on {device}"
    return label, timed(device, rounds, on(kwargs)), timed(device, rounds, on(placed))


def kernels(work: Callable[[], Any]) -> None:
    """The device's kernels in one call of `work` (`--profile`), most time first, on stderr."""
    import torch
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.profiler.profile(activities=activities) as profiler:
        work()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    events = profiler.key_averages()
    print(events.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=80), file=sys.stderr)


def projections(tiny: bool, rounds: int) -> list[Row]:
    import torch

    from batch_engine.projections import fuse_projections

    device, dtype = ("cpu", torch.float32) if tiny else ("cuda", torch.bfloat16)
    hidden, heads, kv_heads, layers = (64, 64, 16, 2) if tiny else (4096, 4096, 256, 40)

    def attention() -> Any:
        with torch.device(device):
            return SimpleNamespace(
                self_attn=SimpleNamespace(
                    **{
                        name: torch.nn.Linear(hidden, size, bias=True, dtype=dtype)
                        for name, size in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads))
                    }
                )
            )

    decoder = SimpleNamespace(layers=[attention() for _ in range(layers)])
    inputs = {batch: torch.randn(batch, 1, hidden, device=device, dtype=dtype) for batch in (1, 8, 32)}

    def step(x: Any) -> Callable[[], None]:
        def project() -> None:
            for layer in decoder.layers:
                layer.self_attn.q_proj(x), layer.self_attn.k_proj(x), layer.self_attn.v_proj(x)

        return project

    apart = {batch: replayed(device, rounds, step(x)) for batch, x in inputs.items()}
    with torch.inference_mode():
        fuse_projections(decoder)
    fused = {batch: replayed(device, rounds, step(x)) for batch, x in inputs.items()}
    return [(f"q/k/v projections, {layers} layers, batch {batch}, ms", apart[batch], fused[batch]) for batch in inputs]


def replayed(device: str, rounds: int, step: Callable[[], None]) -> float:
    """Milliseconds of `step`: as one captured CUDA graph replayed 50 times a round on a GPU, else called eagerly."""
    import torch

    with torch.inference_mode():
        if device != "cuda":
            return timed(device, rounds, step)
        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()

        def fifty() -> None:
            for _ in range(50):
                graph.replay()

        return timed(device, rounds, fifty) / 50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU: proves the code path")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--image-side", type=int, default=1024)
    parser.add_argument("--profile", action="store_true", help="print the kernels of one encoder call (stderr)")
    args = parser.parse_args()
    import torch

    if not args.tiny and not torch.cuda.is_available():
        parser.error("the full-size parts need a CUDA GPU (about 21 GB); use --tiny to check the code path on a CPU")
    side = 64 if args.tiny else args.image_side
    model, processor, device = load(args.tiny)
    rows, note, tokens = encoder(model, processor, device, side, args.rounds, args.profile)
    notes = [note, text_layer(model, device, args.rounds, tokens)]
    rows += [processing(processor, device, side, args.rounds), *projections(args.tiny, args.rounds)]
    print("| part | as it was | as the service runs it | speed-up |")
    print("| --- | ---: | ---: | ---: |")
    for label, before, after in rows:
        print(f"| {label} | {before:.3f} | {after:.3f} | {before / after:.2f}× |")
    print()
    for line in notes:
        print(f"- {line}")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else "CPU"
    print(f"- on {gpu}; torch {torch.__version__}; rounds {args.rounds}")


if __name__ == "__main__":
    main()
