"""The reasoning stage's `local` backend on the batching engine against plain `generate`, as a user runs it: two
stage servers (`python -m reasoning_stage serve --engine generate`, then `--engine batched`) on the embedded
SmolLM2-135M-Instruct on this CPU, each driven by the `openai` client with the same concurrent greedy requests.

    .venv/bin/python -m bench.local_engine [--clients 8] [--max-tokens 64] [--rounds 3]

It prints each server's best wall time of `--rounds` for all the requests at once, the tokens written, tokens/s, the
ratio, and whether both servers wrote the same answers (greedy decoding: they should, token for token).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from openai import AsyncOpenAI

from bench.processes import ROOT, base_env, free_port, stop, wait_ready

QUESTIONS = (
    "What is 12 plus 30?",
    "Name a colour of the sky.",
    "Is a receipt a business expense?",
    "Say hello in French.",
    "How many days are in a week?",
    "What is the capital of France?",
    "Give one use of a hammer.",
    "Is water wet?",
)


async def drive(url: str, clients: int, max_tokens: int, rounds: int) -> tuple[float, int, list[str]]:
    """The best wall time of `rounds` for `clients` requests at once; the tokens written and the answers."""
    client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
    model = (await client.models.list()).data[0].id
    questions = [QUESTIONS[n % len(QUESTIONS)] for n in range(clients)]
    times: list[float] = []
    answers: list[str] = []
    written = 0
    for _ in range(rounds + 1):  # the first round warms the server up
        started = time.perf_counter()
        replies = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": q}], max_tokens=max_tokens, temperature=0
                )
                for q in questions
            )
        )
        times.append(time.perf_counter() - started)
        answers = [reply.choices[0].message.content or "" for reply in replies]
        written = sum(reply.usage.completion_tokens for reply in replies if reply.usage)
    await client.close()
    return min(times[1:]), written, answers


def serve(engine: str, clients: int, logs: Path, args: argparse.Namespace) -> tuple[float, int, list[str]]:
    """One stage server with `--engine engine`, on every core (not pinned: as a user starts it), driven."""
    port = free_port()
    argv = [sys.executable, "-m", "reasoning_stage", "serve", "--port", str(port), "--engine", engine]
    argv += ["--engine-slots", str(clients), "--engine-max-tokens", "1024"]
    log = logs / f"reasoning-{engine}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, cwd=ROOT, env=base_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_ready(engine, process, f"http://127.0.0.1:{port}/health", log, 300.0)
        return asyncio.run(drive(f"http://127.0.0.1:{port}/v1", clients, args.max_tokens, args.rounds))
    finally:
        stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-local-engine-") as logs:
        results = {engine: serve(engine, args.clients, Path(logs), args) for engine in ("generate", "batched")}
    print(f"{args.clients} concurrent greedy requests of at most {args.max_tokens} tokens, best of {args.rounds}\n")
    print("| `--engine` | wall s | tokens | tokens/s |")
    print("| --- | ---: | ---: | ---: |")
    rates = {}
    for engine, (seconds, written, _) in results.items():
        rates[engine] = written / seconds
        print(f"| {engine} | {seconds:.2f} | {written} | {rates[engine]:.1f} |")
    print(f"\nbatched / generate: {rates['batched'] / rates['generate']:.2f}×")
    same = results["generate"][2] == results["batched"][2]
    print(f"same answers: {'yes' if same else 'no'}")


if __name__ == "__main__":
    main()
