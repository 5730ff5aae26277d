"""The `local` reasoning backend's batching engine against plain `model.generate` on the same full-size GLM-4 text
model, side by side in one run.

    python -m bench.gpu_text [--rounds 3] [--prompt-tokens 1024] [--answer-tokens 256] [--compile]   # on a GPU
    python -m bench.gpu_text --tiny                                                                  # on a CPU

No weights are downloaded: the model is GLM-4-9B-0414's architecture (`Glm4Config()` defaults: 40 layers, 4096 wide,
32 query and 2 KV heads, half-rotary; 9.4 B parameters, bfloat16 on the GPU) with random weights, and the prompts are
random token ids of one length (a reasoning prompt: the vision stage's description and the question). No stop token
is set, so every answer runs to its budget on both paths, and the engine does not stop at loops here. `--tiny` runs
a 2-layer model on the CPU instead, to prove the code path, not to measure anything.

Measured, as `bench/gpu_vision.py` measures the vision engine: the first token of one request; decode ms/token at
batch 1; aggregate tokens/s with 8 and 32 concurrent clients (`--answer-tokens` each; plain `generate` as one
batched call over all prompts, equal lengths and no padding), with the first-token latency under that load; and
whether the engine's first 32 tokens equal plain `generate`'s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.gpu_vision import median_of, profile, replays


@dataclass
class TextBench:
    model: Any
    engine: Any
    device: str
    prompt_tokens: int

    def prompt(self, seed: int) -> Any:
        import torch

        generator = torch.Generator().manual_seed(seed)
        vocab = int(self.model.config.vocab_size)
        return torch.randint(0, vocab, (1, self.prompt_tokens), generator=generator)

    def sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def plain(self, ids: Any, new_tokens: int) -> tuple[float, Any]:
        import torch

        ids = ids.to(self.model.device)
        self.sync()
        started = time.perf_counter()
        with torch.inference_mode(), torch.compiler.set_stance("force_eager"):  # layers the engine compiled too
            output = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False
            )
        self.sync()
        return (time.perf_counter() - started) * 1000, output[:, ids.shape[1] :]

    def engine_run(self, prompts: list[Any], new_tokens: int) -> tuple[float, list[Any]]:
        started = time.perf_counter()
        futures = [self.engine.submit({"input_ids": ids}, image_key=None, max_new_tokens=new_tokens) for ids in prompts]
        completions = [future.result(timeout=600) for future in futures]
        return (time.perf_counter() - started) * 1000, completions


def build(tiny: bool, prompt_tokens: int, answer: int, slots: int, compile_layers: bool) -> TextBench:
    import torch
    from transformers import AutoModelForCausalLM, Glm4Config

    from batch_engine.engine import BatchEngine
    from batch_engine.settings import EngineSettings

    torch.manual_seed(0)
    if tiny:
        config = Glm4Config(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, pad_token_id=0,
        )  # fmt: skip
        device, dtype = "cpu", torch.float32
    else:
        config, device, dtype = Glm4Config(), "cuda", torch.bfloat16
    from_config: Callable[..., Any] = AutoModelForCausalLM.from_config  # unannotated in transformers
    with torch.device(device):
        model = from_config(config, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # random weights: every answer runs to its budget
    bench = TextBench(model, None, device, prompt_tokens)
    longest = max(256, prompt_tokens + answer + 64)
    settings = EngineSettings(
        slots=slots, max_tokens=longest, queue_size=4 * slots, compile=compile_layers, stop_loops=False
    )
    bench.engine = BatchEngine(model, settings)
    started = time.perf_counter()
    bench.engine.start()
    if compile_layers:  # the first prefill and decode steps compile: one request outside the timing
        bench.engine_run([bench.prompt(0)], 4)
    print(
        f"engine started (graphs: {len(bench.engine.device.graphs)}) in {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    return bench


def run(bench: TextBench, rounds: int, answer: int, clients: tuple[int, ...]) -> tuple[list[Any], list[str]]:
    import torch

    one = bench.prompt(0)
    _, plain_ids = bench.plain(one, 32)
    _, (check,) = bench.engine_run([one], 32)
    same = next((n for n, (a, b) in enumerate(zip(plain_ids[0].tolist(), check.ids, strict=False)) if a != b), None)
    notes = [f"first 32 tokens equal to plain generate: {'yes' if same is None else f'no, they part at {same}'}"]
    if same is not None:
        notes.append(near_tie(bench, one, plain_ids[0, :same].tolist(), check.ids[same]))
    seeds = iter(range(1000, 100000))
    plain_first = median_of(rounds, lambda: bench.plain(one, 1)[0])
    plain_full = median_of(max(1, rounds // 2), lambda: bench.plain(one, 1 + 64)[0])

    def engine_first() -> float:
        _, (done,) = bench.engine_run([bench.prompt(next(seeds))], 1)
        return float(done.first_token_ms)

    def engine_decode() -> float:
        prompt = bench.prompt(next(seeds))
        first_ms, _ = bench.engine_run([prompt], 1)
        full_ms, (done,) = bench.engine_run([prompt], 1 + 64)
        return (full_ms - first_ms) / max(1, len(done.ids) - 1)

    rows = [
        ("first token, one request, ms (p50)", plain_first, median_of(rounds, engine_first)),
        ("decode at batch 1, ms/token", (plain_full - plain_first) / 64, median_of(rounds, engine_decode)),
    ]
    for count in clients:
        prompts = [bench.prompt(next(seeds)) for _ in range(count)]
        together = torch.cat(prompts)
        plain_ms, plain_out = bench.plain(together, answer)
        plain_first_ms, _ = bench.plain(together, 1)
        bench.engine.batch_sizes.clear()
        engine_ms, done = bench.engine_run(prompts, answer)
        written = sum(len(c.ids) for c in done)
        firsts = sorted(c.first_token_ms for c in done)
        rows.append((f"{count} concurrent, tokens/s", plain_out.numel() / plain_ms * 1000, written / engine_ms * 1000))
        rows.append((f"{count} concurrent, first token ms (p50)", plain_first_ms, statistics.median(firsts)))
        notes.append(
            f"{count} concurrent: engine wrote {written} tokens in {engine_ms:.0f} ms, worst first token "
            f"{firsts[-1]:.0f} ms, mean decode batch {statistics.fmean(bench.engine.batch_sizes):.1f}; plain wrote "
            f"{plain_out.numel()} in {plain_ms:.0f} ms"
        )
    notes.append(replays(bench.engine, bench.sync))
    return rows, notes


def near_tie(bench: TextBench, prompt: Any, agreed: list[int], engine_token: int) -> str:
    """Where the two paths part: plain's top two logits there (eager forward), and the engine's token's place."""
    import torch

    ids = torch.cat([prompt, torch.tensor([agreed], dtype=prompt.dtype)], dim=1).to(bench.model.device)
    with torch.inference_mode(), torch.compiler.set_stance("force_eager"):
        logits = bench.model(ids).logits[0, -1].float()
    top = torch.topk(logits, 2)
    rank = int((logits > logits[engine_token]).sum())
    return (
        f"where they part, plain's top two logits are {top.values[0]:.4f} and {top.values[1]:.4f} (ids "
        f"{top.indices.tolist()}); the engine's token {engine_token} is at rank {rank} with {logits[engine_token]:.4f}"
    )


def float32_check(bench: TextBench) -> str:
    """Whether the engine and plain `generate` agree on 32 tokens with the model in float32."""
    from batch_engine.engine import BatchEngine
    from batch_engine.settings import EngineSettings

    bench.model.float()
    one = bench.prompt(0)
    bench.engine = BatchEngine(bench.model, EngineSettings(slots=2, max_tokens=bench.prompt_tokens + 256))
    bench.engine.start()
    try:
        _, plain_ids = bench.plain(one, 32)
        _, (check,) = bench.engine_run([one], 32)
    finally:
        bench.engine.close()
    plain = plain_ids[0].tolist()
    same = next((n for n, (a, b) in enumerate(zip(plain, check.ids, strict=False)) if a != b), None)
    return f"in float32, first 32 tokens equal to plain generate: {'yes' if same is None else f'no, part at {same}'}"


def describe(bench: TextBench) -> str:
    import torch
    import transformers

    parameters = sum(p.numel() for p in bench.model.parameters()) / 1e9
    gpu = torch.cuda.get_device_name() if bench.device == "cuda" else "CPU"
    settings = bench.engine.settings
    return (
        f"{type(bench.model).__name__}, {parameters:.2f} B parameters, {bench.model.dtype}, on {gpu}; torch "
        f"{torch.__version__}, transformers {transformers.__version__}; prompt {bench.prompt_tokens} tokens; engine "
        f"{settings.slots} slots of {settings.max_tokens} tokens, {len(bench.engine.device.graphs)} graphs"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU: proves the code path")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--answer-tokens", type=int, default=256)
    parser.add_argument("--clients", default="8,32", help="concurrent clients, comma-separated (default: 8,32)")
    parser.add_argument("--compile", action="store_true", help="the engine with compiled decoder layers")
    parser.add_argument("--profile", action="store_true", help="after the run, the device's kernels in decode steps")
    parser.add_argument(
        "--check-float32", action="store_true", help="after the run, compare 32 tokens with plain generate in float32"
    )
    args = parser.parse_args()
    import torch

    if not args.tiny and not torch.cuda.is_available():
        parser.error("the full-size model needs a CUDA GPU (about 19 GB); use --tiny to check the code path on a CPU")
    prompt_tokens, answer = (64, min(args.answer_tokens, 16)) if args.tiny else (args.prompt_tokens, args.answer_tokens)
    clients = tuple(int(n) for n in args.clients.split(","))
    started = time.perf_counter()
    bench = build(args.tiny, prompt_tokens, answer, slots=max(clients), compile_layers=args.compile)
    print(f"built in {time.perf_counter() - started:.1f} s: {describe(bench)}", file=sys.stderr)
    try:
        rows, notes = run(bench, args.rounds, answer, clients)
        if args.profile:
            profile(bench.engine, bench.device, bench.sync)
    finally:
        bench.engine.close()
    summary = describe(bench)
    if args.check_float32:
        notes.append(float32_check(bench))
    print("| measure | plain `model.generate` | batching engine | engine's speed-up |")
    print("| --- | ---: | ---: | ---: |")
    for label, plain, ours in rows:
        ratio = ours / plain if "tokens/s" in label else plain / ours
        print(f"| {label} | {plain:.1f} | {ours:.1f} | {ratio:.2f}× |")
    print()
    print(*(f"- {note}" for note in notes), sep="\n")
    print()
    print(summary)


if __name__ == "__main__":
    main()
