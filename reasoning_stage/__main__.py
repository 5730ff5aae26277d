"""Command line: `python -m reasoning_stage serve --backend local [...]`, the reasoning stage as its own
OpenAI-compatible server (see `reasoning_stage.server`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path

from reasoning_stage.errors import ReasoningError

log = logging.getLogger("reasoning_stage")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return asyncio.run(_serve(args))
    except ReasoningError as exc:
        log.error("could not start the reasoning stage: %s", exc)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m reasoning_stage", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve POST /v1/chat/completions, GET /v1/models and GET /health")
    serve.add_argument("--backend", choices=("local",), default="local", help="what reasons (default: local)")
    serve.add_argument("--model", help="a local directory or hub id of a chat model (default: the embedded SmolLM2)")
    serve.add_argument("--served-model-name", help="the name clients ask for (default: the backend's model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8002, help="port to bind (default: 8002)")
    serve.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    serve.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32 (default: auto)")
    serve.add_argument("--cache-dir", type=Path, help="where the embedded model is converted to (default: user cache)")
    serve.add_argument("--allow-download", action="store_true", help="fetch a hub id missing from the local cache")
    serve.add_argument("--max-tokens", type=int, help="completion budget of a request that sets none (default: 256)")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


async def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from reasoning_stage.local import LocalReasoningBackend
    from reasoning_stage.server import DEFAULT_MAX_TOKENS, create_app

    started = time.perf_counter()
    log.info("loading reasoning backend %r ...", args.backend)
    backend = await LocalReasoningBackend.load(
        args.model, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir, allow_download=args.allow_download
    )
    seconds = time.perf_counter() - started
    log.info(
        "loaded reasoning backend %r (model %s, %s) in %.2f s", backend.name, backend.model, backend.source, seconds
    )
    name = args.served_model_name or backend.model
    app = create_app(backend, served_model_name=name, default_max_tokens=args.max_tokens or DEFAULT_MAX_TOKENS)
    log.info("serving %r on http://%s:%d/v1", name, args.host, args.port)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, workers=1)
    await uvicorn.Server(config).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
