"""The batching engine against plain `model.generate` on the same full-size GLM-4.6V-Flash, side by side in one run.

    python bench/gpu_vision.py [--rounds 5] [--answer-tokens 256] [--image-side 1024]    # on the GPU machine
    python bench/gpu_vision.py --tiny                                                    # the same code on a CPU

No weights are downloaded: the model is GLM-4.6V-Flash's full architecture with random weights (`Glm46VConfig()`
defaults, text rotary `partial_rotary_factor` 0.5; 10.29 B parameters, bfloat16 on the GPU), built in memory with a
real-sized word-level vocabulary (`tests/tiny_glm4v.py`). Random weights give garbage text but the true compute; stop
and other special tokens are suppressed for both paths alike, and the engine does not stop at loops here
(`EngineSettings.stop_loops`), so every answer runs to its budget on both. `--tiny` runs a 2-layer model on
the CPU instead, to prove the code path, not to measure anything.

Both paths get the processor's output prepared outside the timing (the processor costs the same on either), made as
the `glm` backend makes it: on a GPU, the image processed there and its pixels kept in the model's dtype
(`vision_stage.glm_codec.image_device`). Measured:

- first token, one request alone (1024×1024 image): plain `generate(max_new_tokens=1)`; the engine's submit → first
  token (M-RoPE positions, encoder, prefill);
- decode ms/token at batch 1: (t(1 + N) − t(1)) / N for plain, the same over the tokens written for the engine;
- first token at a prompt length not met before: as the first row, each question longer than any before it, so that
  each request is the first of its length (cuDNN's attention plans each new shape, `bench/gpu_sdpa_shapes.py`; the
  first row's prompts are all of one length);
- aggregate tokens/s with 8 and 32 concurrent clients on distinct images (`--answer-tokens` each): plain is one
  batched `generate` over all prompts (they are of equal length, so no padding); the engine gets every request at
  once and batches them as it can; with each, the first-token latency under that load (plain: the batch's first
  token; the engine: median and worst submit → first token);
- follow-up first token: another question on an image the engine has just answered (its prefix KV reused), against
  plain `generate`'s first token on the same prompt.

It also checks that the engine's first 32 tokens equal plain `generate`'s on the same prompt, and prints one markdown
table with the ratios. The engine's measures all run first, then plain `generate`'s (`bench.gpu_common.scenarios`), as a
service runs the engine alone (whether plain `generate` run before slows the engine is not established:
bench/RESULTS.md). The profiles (`--profile`) run after both.
"""

from __future__ import annotations

import hashlib
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `bench`, `tests` and the stage packages importable
    sys.path.insert(0, str(ROOT))

from bench.gpu_alone import Prompts  # noqa: E402
from bench.gpu_common import FollowUp, Paths, drive, scenarios, start_engine, what_ran  # noqa: E402
from bench.gpu_options import engine_options, parsed  # noqa: E402

QUESTIONS = ("What is written on the sign?", "What colour is the sky?", "How many people are there?", "Is it day?")


@dataclass
class Bench(Paths):
    processor: Any = None
    side: int = 0
    answer: int = 0

    def prompt(self, seed: int, question: str = QUESTIONS[0]) -> Any:
        from vision_stage.glm_codec import chat_messages, image_device
        from vision_stage.prompts import task_prompt

        messages = chat_messages(noise(self.side, seed), task_prompt("answer", question))
        placed = image_device(self.processor, self.model.device)
        inputs = self.processor.apply_chat_template(messages, **chat_kwargs(self.processor, placed))
        if placed is not None:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def generate_inputs(self, inputs: Any) -> dict[str, Any]:
        return {name: tensor.to(self.model.device) for name, tensor in inputs.items()}

    def request(self, prompt: Any) -> tuple[dict[str, Any], str | None]:
        """Keyed by its image's content, as the backend keys a decoded image."""
        import torch

        pixels = prompt["pixel_values"].contiguous().cpu().view(torch.uint8)
        return prompt, hashlib.sha256(pixels.numpy().tobytes()).hexdigest()

    def together(self, prompts: list[Any]) -> Any:
        import torch

        return {name: torch.cat([p[name] for p in prompts]) for name in prompts[0]}


def build(tiny: bool, side: int, answer: int, **engine: Any) -> Bench:
    import torch

    from tests.tiny_glm4v import full_size_glm46v_flash, glm_processor, glm_tokenizer, tiny_glm4v_model

    torch.manual_seed(0)
    if tiny:
        tokenizer = glm_tokenizer()
        model, processor = tiny_glm4v_model(tokenizer).eval(), glm_processor(tokenizer, max_visual_tokens=256)
        device = "cpu"
    else:
        model, processor = full_size_glm46v_flash("cuda", torch.bfloat16)
        device = "cuda"
    write_words_only(model, processor.tokenizer)
    bench = Bench(model, None, device, processor=processor, side=side, answer=answer)
    longest = max(256, int(bench.prompt(0)["input_ids"].shape[1]) + answer + 64)
    start_engine(bench, longest, bench.prompt(0), **engine)
    return bench


def write_words_only(model: Any, tokenizer: Any) -> None:
    """Random weights: no stop token, and no special or markup token either; both paths read this config."""
    from tests.tiny_glm4v import CONTROL_TOKENS, MARKUP_TOKENS

    model.generation_config.eos_token_id = None
    model.generation_config.suppress_tokens = tokenizer.convert_tokens_to_ids([*CONTROL_TOKENS, *MARKUP_TOKENS])


def chat_kwargs(processor: Any, device: str | None = None) -> dict[str, Any]:
    """The processor arguments `GlmCodec.encode` uses (its `image_device`: `device`)."""
    from vision_stage.glm_codec import visual_budget

    images = {"size": visual_budget(processor.image_processor).size(), **({"device": device} if device else {})}
    return {
        "tokenize": True,
        "add_generation_prompt": True,
        "return_dict": True,
        "return_tensors": "pt",
        "enable_thinking": False,
        "processor_kwargs": {"images_kwargs": images},
    }


def noise(side: int, seed: int) -> Image.Image:
    """A distinct image per seed, all of one size (so that every prompt has the same length)."""
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
    return Image.fromarray(pixels).resize((side, side), Image.Resampling.BILINEAR)


def run(
    bench: Bench, rounds: int, clients: tuple[int, ...], compare: tuple[str, ...] = ()
) -> tuple[list[tuple[str, float, float]], list[str]]:
    answer, one = bench.answer, bench.prompt(0)
    seeds = iter(range(1000, 100000))

    def fresh() -> Any:
        """A prompt on an image not seen before."""
        return bench.prompt(next(seeds))

    def forget() -> None:
        bench.engine.device.prefixes.clear()
        bench.engine.device.encoder.clear()

    def new_length(n: int) -> Any:
        """A prompt on an image not seen before, its question `n` sentences longer (a length not met before)."""
        return bench.prompt(next(seeds), QUESTIONS[0] + " Answer in one word." * n)

    waits: list[float] = []

    def follow_up() -> float:
        seed = next(seeds)
        bench.engine_run([bench.prompt(seed, QUESTIONS[0])], 1)
        _, (done,) = bench.engine_run([bench.prompt(seed, QUESTIONS[1])], 1)
        if done.reused_tokens == 0:
            raise RuntimeError("the follow-up did not reuse its image's prefix")
        waits.append(done.queue_ms)
        return float(done.first_token_ms)

    return scenarios(
        bench, rounds, Prompts(one, fresh, forget, new_length), clients, answer,
        FollowUp(
            "follow-up on the same image, first token ms (p50)", follow_up,
            lambda: f"follow-ups: submit → admitted {statistics.median(waits):.1f} ms (p50), the rest is the prefill",
        ),
        compare,
    )  # fmt: skip


def prefill_profile(bench: Bench) -> None:
    """Where a cold image prefill's time goes: the vision encoder alone and the whole prefill, timed with the device
    synchronised (p50 of 5 images), then the device's kernels and the host's time in one prefill."""
    import torch
    from torch.profiler import ProfilerActivity

    from batch_engine.images import encode_images

    device = bench.engine.device
    encoder_ms, prefill_ms, rope_ms = [], [], []
    with torch.inference_mode():
        for seed in range(6):
            inputs = bench.prompt(5000 + seed)
            started = time.perf_counter()
            prompt = bench.engine.prepare(inputs, f"profile-{seed}")
            rope_ms.append((time.perf_counter() - started) * 1000)
            bench.sync()
            started = time.perf_counter()
            encode_images(prompt, bench.model, None)
            bench.sync()
            encoder_ms.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            device.prefill(prompt, 0, None)
            bench.sync()
            prefill_ms.append((time.perf_counter() - started) * 1000)
            device.release(0)
            device.encoder.clear()
            device.prefixes.clear()
        print(
            f"cold prefill, p50 of 5 after one warm-up: positions and keys {statistics.median(rope_ms[1:]):.1f} ms "
            f"(caller's thread), encoder alone {statistics.median(encoder_ms[1:]):.1f} ms, whole prefill "
            f"{statistics.median(prefill_ms[1:]):.1f} ms",
            file=sys.stderr,
        )
        if bench.device != "cuda":
            return
        prompt = bench.engine.prepare(bench.prompt(6000), "profile-last")
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
        bench.sync()
        with torch.profiler.profile(activities=activities) as profiler:
            device.prefill(prompt, 0, None)
            bench.sync()
        device.release(0)
    events = profiler.key_averages()
    device_ms = sum(event.self_device_time_total for event in events) / 1000
    print(f"one cold prefill: {device_ms:.1f} ms of device time in kernels", file=sys.stderr)
    print(events.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90), file=sys.stderr)


def describe(bench: Bench) -> str:
    inputs = bench.prompt(0)
    t, h, w = (int(n) for n in inputs["image_grid_thw"][0].tolist())
    return what_ran(bench, f"{inputs['input_ids'].shape[1]} tokens of which {t * h * w // 4} visual ({h}×{w} patches)")


def float32_prompt(bench: Bench) -> tuple[Any, int]:
    one = bench.prompt(0)
    return one, max(256, int(one["input_ids"].shape[1]) + 64)


def main() -> None:
    description = __doc__.splitlines()[0] if __doc__ else None
    args, side, answer = parsed(description, device_memory="21 GB", size="--image-side", default=1024)
    drive(
        args,
        lambda: build(args.tiny, side, answer, **engine_options(args)),
        lambda bench: run(bench, args.rounds, args.clients, tuple(args.compare)),
        describe,
        check=float32_prompt,
        more_profiles=prefill_profile,
    )


if __name__ == "__main__":
    main()
