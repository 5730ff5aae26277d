"""Command line: `python -m orchestrator serve [--host H] [--port P]`, and `python -m orchestrator eval …`, which runs a
joint test set through both stages (`orchestrator.evaluation.cli`).

It binds to 127.0.0.1 unless `--host` says otherwise; with no API keys configured (`ORCH_API_KEYS`), binding to
anything but a loopback address is allowed, with a loud warning.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from pydantic import ValidationError

from orchestrator.evaluation import cli as evaluation
from orchestrator.observability import logs
from orchestrator.security.access import ApiKeys
from orchestrator.settings import Settings

DEFAULT_HOST = "127.0.0.1"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the HTTP API (settings come from ORCH_* variables)")
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default: {DEFAULT_HOST})")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (default: 8000)")
    evaluation.add_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "eval":
        return evaluation.run(args)

    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"invalid settings in ORCH_* environment variables:\n{exc}", file=sys.stderr)
        return 2
    try:
        keys = ApiKeys.parse(settings.api_keys.get_secret_value() if settings.api_keys else None)
    except ValueError as exc:
        print(f"invalid ORCH_API_KEYS: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    if not keys.enabled and not _loopback(args.host):
        logging.getLogger("orchestrator").warning(
            "BINDING %s WITHOUT API KEYS: anyone who can reach this address can use the service and its backends; "
            "set ORCH_API_KEYS, or bind to 127.0.0.1",
            args.host,
        )
    return _serve(settings, args.host, args.port)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _serve(settings: Settings, host: str, port: int) -> int:
    import uvicorn

    from orchestrator.api.app import create_app
    from stage_protocol.server.command import UVICORN_OPTIONS, keep_large_buffers_in_heap

    log = logging.getLogger("orchestrator")
    log.info(
        "starting on http://%s:%d with vision backend %r and reasoning backend %r",
        host,
        port,
        settings.vision.backend,
        settings.reasoning.backend,
    )
    keep_large_buffers_in_heap()
    app = create_app(settings)
    # log_config=None: uvicorn's own loggers go through the handler `logs.configure` installed (JSON by default)
    uvicorn.run(app, host=host, port=port, log_level=settings.log_level, log_config=None, **UVICORN_OPTIONS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
