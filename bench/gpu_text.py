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
batch 1; the first token of a prompt shorter than any before it (a length not met before); aggregate tokens/s with
8 and 32 concurrent clients (`--answer-tokens` each; plain `generate` as one batched call over all prompts, equal
lengths and no padding), with the first-token latency under that load; the first token of a follow-up that shares
all but its last 64 tokens with an earlier prompt (the engine keeps text prefixes in blocks of 32 tokens), against
plain `generate`'s first token; and whether the engine's first 32 tokens equal plain `generate`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.gpu_alone import Prompts
from bench.gpu_common import FollowUp, Paths, drive, scenarios, start_engine, what_ran
from bench.gpu_options import engine_options, parsed


@dataclass
class TextBench(Paths):
    prompt_tokens: int = 0

    def prompt(self, seed: int) -> Any:
        import torch

        generator = torch.Generator().manual_seed(seed)
        vocab = int(self.model.config.vocab_size)
        return torch.randint(0, vocab, (1, self.prompt_tokens), generator=generator)

    def generate_inputs(self, ids: Any) -> dict[str, Any]:
        import torch

        ids = ids.to(self.model.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def request(self, prompt: Any) -> tuple[dict[str, Any], str | None]:
        return {"input_ids": prompt}, None

    def together(self, prompts: list[Any]) -> Any:
        import torch

        return torch.cat(prompts)


def build(tiny: bool, prompt_tokens: int, answer: int, **engine: Any) -> TextBench:
    import torch
    from transformers import AutoModelForCausalLM, Glm4Config

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
    bench = TextBench(model, None, device, prompt_tokens=prompt_tokens)
    start_engine(bench, max(256, prompt_tokens + answer + 64), bench.prompt(0), **engine)
    return bench


def run(
    bench: TextBench, rounds: int, answer: int, clients: tuple[int, ...], compare: tuple[str, ...] = ()
) -> tuple[list[Any], list[str]]:
    import torch

    one = bench.prompt(0)
    seeds = iter(range(1000, 100000))

    def fresh() -> Any:
        """A prompt not seen before."""
        return bench.prompt(next(seeds))

    def new_length(n: int) -> Any:
        """A prompt not seen before, `n` tokens shorter (a length not met before)."""
        if not 0 < n < bench.prompt_tokens:
            raise ValueError(f"a prompt of {bench.prompt_tokens} tokens has no length {n} shorter")
        return fresh()[:, :-n]

    tail = min(64, bench.prompt_tokens // 2)
    reused: list[int] = []

    def follow_up() -> float:
        """Another question after the same instructions and description: all but the last `tail` tokens shared."""
        opening = fresh()
        bench.engine_run([opening], 1)
        again = torch.cat([opening[:, :-tail], fresh()[:, :tail]], dim=1)
        _, (done,) = bench.engine_run([again], 1)
        reused.append(done.reused_tokens)
        return float(done.first_token_ms)

    return scenarios(
        bench, rounds, Prompts(one, fresh, bench.engine.device.prefixes.clear, new_length), clients, answer,
        FollowUp(
            "follow-up on the same prefix, first token ms (p50)", follow_up,
            lambda: f"follow-ups: {tail} new tokens after {min(reused)}–{max(reused)} reused",
        ),
        compare,
    )  # fmt: skip


def describe(bench: TextBench) -> str:
    return what_ran(bench, f"{bench.prompt_tokens} tokens")


def main() -> None:
    description = __doc__.splitlines()[0] if __doc__ else None
    args, prompt_tokens, answer = parsed(description, device_memory="19 GB", size="--prompt-tokens", default=1024)
    drive(
        args,
        lambda: build(args.tiny, prompt_tokens, answer, **engine_options(args)),
        lambda bench: run(bench, args.rounds, answer, args.clients, tuple(args.compare)),
        describe,
        check=lambda bench: (bench.prompt(0), bench.prompt_tokens + 256),
    )


if __name__ == "__main__":
    main()
