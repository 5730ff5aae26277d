"""The `glm` vision backend against plain `model.generate` on the same full-size GLM-4.6V-Flash, in one run.

    python bench/gpu_vision.py [--rounds 5] [--decode-tokens 64] [--image-side 1024]    # on the GPU machine
    python bench/gpu_vision.py --tiny                                                   # the same code path on a CPU

No weights are downloaded: the model is GLM-4.6V-Flash's full architecture with random weights (`Glm46VConfig()`
defaults, text rotary `partial_rotary_factor` 0.5; 10.29 B parameters, bfloat16 on the GPU), built in memory with a
real-sized word-level vocabulary (`tests/tiny_glm4v.py`). Random weights give garbage text but the true compute; stop
and other special tokens are suppressed (for both paths alike) so every generation writes exactly the words asked
for. `--tiny` runs a 2-layer model on
the CPU instead, to prove the code path end to end, not to measure anything.

One image (a gradient, `--image-side` pixels square) and a short question (the `answer` task). Each round measures,
in an order that alternates between rounds:

- plain: `model.generate(**inputs)` on inputs the processor prepared once, outside the timing, with
  `max_new_tokens` 1 (time to first token: the vision encoder and the prefill) and 1 + N;
- backend: `GlmVisionBackend.generate(request)` with `max_new_tokens` 1 and 1 + N, everything a request costs
  (chat template, image processor, generation, decoding, parsing, the image's facts, the worker thread);
- the processor alone (`apply_chat_template` with the image), which explains most of the difference.

Decode speed is (t(1 + N) − t(1)) / N. It prints the medians and the ratio backend / plain as a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    import torch

    from vision_stage.glm import GlmVisionBackend
    from vision_stage.types import VisionRequest

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is written on the sign?"


@dataclass(frozen=True)
class Setup:
    model: Any
    processor: Any
    request: VisionRequest
    inputs: Mapping[str, torch.Tensor]
    """The processor's output for `request`, on the model's device: plain `generate`'s input."""
    first: GlmVisionBackend
    """The backend at `max_new_tokens` 1."""
    full: GlmVisionBackend
    """The same engine at `max_new_tokens` 1 + N."""
    device: str
    describe: str


def build(tiny: bool, image_side: int, decode_tokens: int) -> Setup:
    import torch

    from tests.tiny_glm4v import full_size_glm46v_flash, glm_processor, glm_tokenizer, tiny_glm4v_model
    from vision_stage.glm import GlmEngine, GlmVisionBackend
    from vision_stage.glm_codec import GlmCodec, chat_messages
    from vision_stage.prompts import task_prompt
    from vision_stage.types import DecodedImage, VisionRequest

    device = "cpu" if tiny else "cuda"
    torch.manual_seed(0)
    if tiny:
        tokenizer = glm_tokenizer()
        model, processor = tiny_glm4v_model(tokenizer).eval(), glm_processor(tokenizer, max_visual_tokens=256)
    else:
        model, processor = full_size_glm46v_flash(device, torch.bfloat16 if device == "cuda" else torch.float32)
    write_words_only(model, processor.tokenizer)
    pixels = gradient(image_side)
    request = VisionRequest(DecodedImage(pixels, "PNG", image_side, image_side, 0, ""), QUESTION, task="answer")
    engine = GlmEngine(model, GlmCodec(processor), name="random GLM-4.6V-Flash")
    messages = chat_messages(pixels, task_prompt("answer", QUESTION))
    inputs = engine.codec.processor.apply_chat_template(messages, **chat_kwargs(processor)).to(model.device)
    name = "tiny random GLM-4.6V" if tiny else "random GLM-4.6V-Flash"
    first = GlmVisionBackend(engine, model=name, device=device, max_new_tokens=1)
    full = GlmVisionBackend(engine, model=name, device=device, max_new_tokens=1 + decode_tokens)
    return Setup(model, processor, request, inputs, first, full, device, describe_setup(model, inputs, device))


def write_words_only(model: Any, tokenizer: Any) -> None:
    """Random weights: no stop token (every generation writes exactly the tokens asked for), and no special or markup
    token either (the backend's answer is never empty). Plain `generate` reads the same generation config."""
    from tests.tiny_glm4v import CONTROL_TOKENS, MARKUP_TOKENS

    model.generation_config.eos_token_id = None
    model.generation_config.suppress_tokens = tokenizer.convert_tokens_to_ids([*CONTROL_TOKENS, *MARKUP_TOKENS])


def chat_kwargs(processor: Any) -> dict[str, Any]:
    """The processor arguments `GlmCodec.encode` uses, so plain `generate` sees the same prompt."""
    from vision_stage.glm_codec import visual_budget

    return {
        "tokenize": True,
        "add_generation_prompt": True,
        "return_dict": True,
        "return_tensors": "pt",
        "enable_thinking": False,
        "processor_kwargs": {"images_kwargs": {"size": visual_budget(processor.image_processor).size()}},
    }


def gradient(side: int) -> Image.Image:
    ramp = Image.linear_gradient("L").resize((side, side))
    return Image.merge("RGB", (ramp, ramp.transpose(Image.Transpose.ROTATE_90), ramp.point(lambda v: 255 - v)))


def describe_setup(model: Any, inputs: Mapping[str, torch.Tensor], device: str) -> str:
    import torch
    import transformers

    parameters = sum(p.numel() for p in model.parameters()) / 1e9
    t, h, w = (int(n) for n in inputs["image_grid_thw"][0].tolist())
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    return (
        f"{type(model).__name__}, {parameters:.2f} B parameters, {model.dtype}, on {gpu}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, attention {model.config._attn_implementation}; "
        f"prompt {inputs['input_ids'].shape[1]} tokens of which {t * h * w // 4} visual ({h}×{w} patches)"
    )


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def plain_ms(setup: Setup, new_tokens: int) -> float:
    import torch

    synchronize(setup.device)
    started = time.perf_counter()
    with torch.inference_mode():
        output = setup.model.generate(**setup.inputs, max_new_tokens=new_tokens, do_sample=False)
    synchronize(setup.device)
    elapsed = (time.perf_counter() - started) * 1000
    written = output.shape[1] - setup.inputs["input_ids"].shape[1]
    if written != new_tokens:
        raise RuntimeError(f"plain generate wrote {written} tokens, not {new_tokens}")
    return elapsed


async def backend_ms(setup: Setup, backend: GlmVisionBackend) -> float:
    synchronize(setup.device)
    started = time.perf_counter()
    result = await backend.generate(setup.request)
    synchronize(setup.device)
    if result.answer is None:
        raise RuntimeError("the backend gave no answer")
    return (time.perf_counter() - started) * 1000


def processor_ms(setup: Setup) -> float:
    from vision_stage.glm_codec import chat_messages
    from vision_stage.prompts import task_prompt

    started = time.perf_counter()
    messages = chat_messages(setup.request.image.pixels, task_prompt("answer", QUESTION))
    setup.processor.apply_chat_template(messages, **chat_kwargs(setup.processor))
    return (time.perf_counter() - started) * 1000


async def measure(setup: Setup, rounds: int, decode_tokens: int) -> dict[str, list[float]]:
    """One warm-up round, then `rounds` rounds in alternating order; milliseconds per measurement."""
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("plain_first", lambda: plain_ms(setup, 1)),
        ("plain_full", lambda: plain_ms(setup, 1 + decode_tokens)),
        ("backend_first", lambda: backend_ms(setup, setup.first)),
        ("backend_full", lambda: backend_ms(setup, setup.full)),
        ("processor", lambda: processor_ms(setup)),
    ]
    samples: dict[str, list[float]] = {name: [] for name, _ in steps}
    for round_index in range(rounds + 1):
        for name, step in steps if round_index % 2 else reversed(steps):
            value = step()
            elapsed = await value if asyncio.iscoroutine(value) else value
            if round_index > 0:
                samples[name].append(float(elapsed))
    return samples


def report(samples: dict[str, list[float]], decode_tokens: int, setup: Setup) -> str:
    p50 = {name: statistics.median(values) for name, values in samples.items()}
    plain_decode = (p50["plain_full"] - p50["plain_first"]) / decode_tokens
    backend_decode = (p50["backend_full"] - p50["backend_first"]) / decode_tokens
    rows = [
        ("time to first token, ms (p50)", p50["plain_first"], p50["backend_first"]),
        ("decode, ms/token", plain_decode, backend_decode),
        (f"whole request, 1 + {decode_tokens} tokens, ms (p50)", p50["plain_full"], p50["backend_full"]),
    ]
    lines = [
        "| measure | plain `model.generate` | `GlmVisionBackend.generate` | backend / plain |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {label} | {plain:.1f} | {ours:.1f} | {ours / plain:.2f} |" for label, plain, ours in rows),
        "",
        f"Processor alone (chat template + image processor, counted in the backend only): {p50['processor']:.1f} ms "
        f"(p50). Rounds: {len(samples['plain_first'])}.",
        "",
        setup.describe,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU: proves the code path")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--image-side", type=int, default=1024)
    args = parser.parse_args()
    if not args.tiny and not cuda_available():
        parser.error("the full-size model needs a CUDA GPU (about 21 GB); use --tiny to check the code path on a CPU")
    if str(ROOT) not in sys.path:  # run as a script: make `tests` and the stage packages importable
        sys.path.insert(0, str(ROOT))
    started = time.perf_counter()
    setup = build(args.tiny, args.image_side, args.decode_tokens)
    print(f"built in {time.perf_counter() - started:.1f} s: {setup.describe}", file=sys.stderr)
    samples = asyncio.run(measure(setup, args.rounds, args.decode_tokens))
    print(report(samples, args.decode_tokens, setup))


if __name__ == "__main__":
    main()
