"""Command line: `python -m vision_stage serve --backend glm|ocr [...]`, the vision stage as its own
OpenAI-compatible server (see `vision_stage.server`)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from batch_engine.settings import engine_settings
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
    serve.add_argument(
        "--engine",
        choices=("batched", "generate"),
        default="batched",
        help="glm: the batching engine, or plain generate one request at a time (default: batched)",
    )
    serve.add_argument(
        "--engine-slots", type=_count(1, 128), default=16, help="batched: requests at once (default: 16)"
    )
    serve.add_argument(
        "--engine-max-tokens",
        type=_count(256),
        default=8192,
        help="batched: prompt + answer per request (default: 8192)",
    )
    serve.add_argument("--engine-queue", type=_count(1), default=64, help="batched: requests waiting (default: 64)")
    serve.add_argument(
        "--engine-prefix-mb", type=_count(0), default=4096, help="batched: MiB of image-prefix KV kept (default: 4096)"
    )
    serve.add_argument(
        "--no-cuda-graphs", dest="engine_cuda_graphs", action="store_false", help="batched: no CUDA graphs"
    )
    serve.add_argument(
        "--engine-prefill-tokens", type=_count(1), default=8192, help="batched: prompt tokens per step (default: 8192)"
    )
    serve.add_argument(
        "--engine-compile", choices=("auto", "on", "off"), default="auto", help="batched: compile (default: on a GPU)"
    )
    add_log_level(serve)
    return parser


def _count(low: int, high: int | None = None) -> Callable[[str], int]:
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


async def _serve(args: argparse.Namespace) -> int:
    from vision_stage.server import create_app

    return await serve(
        args, _load(args), lambda backend, name: create_app(backend, served_model_name=name), stage="vision", log=log
    )


async def _load(args: argparse.Namespace) -> VisionBackend:
    if args.backend == "glm":
        from vision_stage.glm import GlmVisionBackend

        return await GlmVisionBackend.load(
            args.model,
            device=args.device,
            dtype=args.dtype,
            thinking=args.thinking,
            max_new_tokens=args.max_new_tokens,
            allow_download=args.allow_download,
            batching=engine_settings(args),
        )
    from vision_stage.ocr import OcrVisionBackend

    return await OcrVisionBackend.load()


if __name__ == "__main__":
    sys.exit(main())
