"""Command line: `python -m vision_stage serve --backend glm|ocr [...]`, the vision stage as its own
OpenAI-compatible server (see `vision_stage.server`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from vision_stage.backend import VisionBackend
from vision_stage.errors import VisionError

log = logging.getLogger("vision_stage")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.backend == "glm" and not args.model:
        parser.error("--backend glm needs --model (a local directory, or a hub id with --allow-download)")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return asyncio.run(_serve(args))
    except VisionError as exc:
        log.error("could not start the vision stage: %s", exc)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vision_stage", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve POST /v1/chat/completions, GET /v1/models and GET /health")
    serve.add_argument("--backend", choices=("glm", "ocr"), default="ocr", help="what looks (default: ocr)")
    serve.add_argument("--model", help="glm: the model's local directory or hub id (ocr needs none)")
    serve.add_argument("--served-model-name", help="the name clients ask for (default: the backend's model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8001, help="port to bind (default: 8001)")
    serve.add_argument("--device", default="cpu", help="glm: torch device (default: cpu)")
    serve.add_argument("--dtype", default="auto", help="glm: auto, bfloat16, float16 or float32 (default: auto)")
    serve.add_argument("--thinking", action="store_true", help="glm: let the model think before answering")
    serve.add_argument("--max-new-tokens", type=int, default=1024, help="glm: tokens per answer (default: 1024)")
    serve.add_argument("--allow-download", action="store_true", help="glm: fetch a hub id missing from the cache")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


async def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from vision_stage.server import create_app

    started = time.perf_counter()
    log.info("loading vision backend %r ...", args.backend)
    backend = await _load(args)
    log.info(
        "loaded vision backend %r (model %s) in %.2f s", backend.name, backend.model, time.perf_counter() - started
    )
    name = args.served_model_name or backend.model
    app = create_app(backend, served_model_name=name)
    log.info("serving %r on http://%s:%d/v1", name, args.host, args.port)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, workers=1)
    await uvicorn.Server(config).serve()
    return 0


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
        )
    from vision_stage.ocr import OcrVisionBackend

    return await OcrVisionBackend.load()


if __name__ == "__main__":
    sys.exit(main())
