"""Command line: `python -m orchestrator serve [--host H] [--port P]`."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from orchestrator.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the HTTP API (settings come from ORCH_* variables)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (default: 8000)")
    args = parser.parse_args(argv)

    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"invalid settings in ORCH_* environment variables:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    return _serve(settings, args.host, args.port)


def _serve(settings: Settings, host: str, port: int) -> int:
    import uvicorn

    from orchestrator.api.app import create_app

    log = logging.getLogger("orchestrator")
    log.info(
        "starting on http://%s:%d with vision backend %r and reasoning backend %r",
        host,
        port,
        settings.vision.backend,
        settings.reasoning.backend,
    )
    app = create_app(settings)
    uvicorn.run(app, host=host, port=port, log_level=settings.log_level, workers=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
