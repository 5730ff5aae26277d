"""Command line: `python -m vision_stage serve --backend glm|ocr [...]`, the vision stage as its own
OpenAI-compatible server (see `vision_stage.server`)."""

from __future__ import annotations

import argparse
import logging
import sys

from batch_engine.settings import add_engine_arguments
from stage_protocol.server.command import add_listening, add_log_level, run, serve, serve_command
from vision_stage.backend import VisionBackend
from vision_stage.errors import VisionError

log = logging.getLogger("vision_stage")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.backend == "glm" and not args.model:
        parser.error("--backend glm needs --model (a local directory, or a hub id with --allow-download)")
    return run(_serve(args), stage="vision", log_level=args.log_level, fails=VisionError, log=log)


def _parser() -> argparse.ArgumentParser:
    parser, serve = serve_command("python -m vision_stage", __doc__)
    serve.add_argument("--backend", choices=("glm", "ocr"), default="ocr", help="what looks (default: ocr)")
    serve.add_argument("--model", help="glm: the model's local directory or hub id (ocr needs none)")
    add_listening(serve, port=8001)
    serve.add_argument("--device", default="cpu", help="glm: torch device (default: cpu)")
    serve.add_argument("--dtype", default="auto", help="glm: auto, bfloat16, float16 or float32 (default: auto)")
    serve.add_argument("--thinking", action="store_true", help="glm: let the model think before answering")
    serve.add_argument("--max-new-tokens", type=int, default=1024, help="glm: tokens per answer (default: 1024)")
    serve.add_argument("--allow-download", action="store_true", help="glm: fetch a hub id missing from the cache")
    add_engine_arguments(serve, default="batched", prefix_mb=4096)
    add_log_level(serve)
    return parser


async def _serve(args: argparse.Namespace) -> int:
    from vision_stage.server import create_app

    return await serve(
        args, _load(args), lambda backend, name: create_app(backend, served_model_name=name), stage="vision", log=log
    )


async def _load(args: argparse.Namespace) -> VisionBackend:
    if args.backend == "glm":
        from vision_stage.glm import GlmVisionBackend

        return await GlmVisionBackend.load_from(args)
    from vision_stage.ocr import OcrVisionBackend

    return await OcrVisionBackend.load()


if __name__ == "__main__":
    sys.exit(main())
