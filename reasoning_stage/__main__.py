"""Command line: `python -m reasoning_stage serve --backend local [...]`, the reasoning stage as its own
OpenAI-compatible server (see `reasoning_stage.server`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from batch_engine.settings import add_engine_arguments
from reasoning_stage.errors import ReasoningError
from stage_protocol.server.command import add_listening, add_log_level, run, serve, serve_command

log = logging.getLogger("reasoning_stage")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run(_serve(args), stage="reasoning", log_level=args.log_level, fails=ReasoningError, log=log)


def _parser() -> argparse.ArgumentParser:
    parser, serve = serve_command("python -m reasoning_stage", __doc__)
    serve.add_argument("--backend", choices=("local",), default="local", help="what reasons (default: local)")
    serve.add_argument("--model", help="a local directory or hub id of a chat model (default: the embedded SmolLM2)")
    add_listening(serve, port=8002)
    serve.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    serve.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32 (default: auto)")
    serve.add_argument("--cache-dir", type=Path, help="where the embedded model is converted to (default: user cache)")
    serve.add_argument("--allow-download", action="store_true", help="fetch a hub id missing from the local cache")
    serve.add_argument("--max-tokens", type=int, help="completion budget of a request that sets none (default: 256)")
    add_engine_arguments(serve, default="generate", prefix_mb=1024)
    add_log_level(serve)
    return parser


async def _serve(args: argparse.Namespace) -> int:
    from reasoning_stage.local import LocalReasoningBackend
    from reasoning_stage.server import DEFAULT_MAX_TOKENS, create_app

    max_tokens = args.max_tokens or DEFAULT_MAX_TOKENS
    return await serve(
        args,
        LocalReasoningBackend.load_from(args),
        lambda backend, name: create_app(backend, served_model_name=name, default_max_tokens=max_tokens),
        stage="reasoning",
        log=log,
        about=lambda backend: f"model {backend.model}, {backend.source}",
    )


if __name__ == "__main__":
    sys.exit(main())
