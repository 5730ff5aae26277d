"""The command line both stage servers share: `python -m <stage> serve [...]` loads a backend and serves it with
uvicorn (`vision_stage.__main__`, `reasoning_stage.__main__` add their backends' own flags)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from starlette.types import ASGIApp

from stage_protocol.backend import StageBackend
from stage_protocol.server.collector import frozen_heap

B = TypeVar("B", bound=StageBackend)
SERVE_HELP = "serve POST /v1/chat/completions, GET /v1/models and GET /health"


LARGE_BUFFERS_IN_HEAP = 64 << 20
"""glibc's `M_MMAP_THRESHOLD` and `M_TRIM_THRESHOLD` as `keep_large_buffers_in_heap` sets them (bytes)."""
HEAP_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
"""glibc's own variables for the two thresholds: when either is set, `keep_large_buffers_in_heap` leaves glibc alone;
so it does when `GLIBC_TUNABLES` names either (`glibc.malloc.mmap_threshold`, `glibc.malloc.trim_threshold`)."""
HEAP_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")


def keep_large_buffers_in_heap() -> bool:
    """Have glibc serve buffers up to 64 MiB from its heap and keep up to 64 MiB free at its top, instead of mapping
    each buffer over 128 KiB afresh (until its threshold adapts): an image request handles several megabyte buffers
    (the body, the decoded bytes, the forwarded body), and fresh mappings are page faults on every first touch. With
    it, a 1 MB image's added latency through the service went from 5.4 to 3.2 ms and its CPU from 5.6 to 3.1 ms
    (docs/benchmarks.md); freed memory is reused rather than returned, which under many large images at once keeps
    more resident than glibc's own thresholds do (`bench/heap_settings.py`: up to 1.1–1.7 GB against 0.8–1.1 after
    rounds of 4 MB images at 32 concurrent requests). An operator who would rather keep less sets fixed thresholds
    of their own through glibc's `MALLOC_MMAP_THRESHOLD_` or `MALLOC_TRIM_THRESHOLD_`, or its `GLIBC_TUNABLES`
    (glibc reads them itself at start), and nothing is changed here. Whether it was set: False where the C library
    is not glibc, or where the environment sets either threshold."""
    import ctypes
    import ctypes.util
    import os

    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(name in os.environ for name in HEAP_ENVIRONMENT) or any(name in tunables for name in HEAP_TUNABLES):
        logging.getLogger(__name__).info("glibc's heap thresholds are left as the environment sets them")
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, LARGE_BUFFERS_IN_HEAP)) and bool(
        mallopt(m_trim_threshold, LARGE_BUFFERS_IN_HEAP)
    )


UVICORN_OPTIONS: dict[str, Any] = {"workers": 1, "reset_contextvars": True}
"""How the service and both stage servers run under uvicorn. `reset_contextvars`: every request starts from an empty
context. Without it a request can start with the context variables of the one before it on the same connection
(CPython issue 140947): on asyncio's own event loop (where uvloop is not installed) after any body over 64 KiB,
which makes uvicorn pause and resume reading (uvicorn's notes name pipelined requests too). The orchestrator's request
deadline and request id are context variables: the next request inherited an earlier one's deadline, long past, and
failed at once as `vision_unavailable` ("the request's deadline passed")."""


def serve_command(prog: str, description: str | None) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The parser of `prog`, and its `serve` command, to which the stage adds its flags (`add_listening` for where,
    `add_log_level` last)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    commands = parser.add_subparsers(dest="command", required=True)
    return parser, commands.add_parser("serve", help=SERVE_HELP)


def add_listening(serve: argparse.ArgumentParser, *, port: int) -> None:
    """`--served-model-name`, `--host` and `--port` (default `port`)."""
    serve.add_argument("--served-model-name", help="the name clients ask for (default: the backend's model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=port, help=f"port to bind (default: {port})")


def add_log_level(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def run(
    serving: Coroutine[Any, Any, int], *, stage: str, log_level: str, fails: type[Exception], log: logging.Logger
) -> int:
    """Log to stderr at `log_level` and run `serving` to its end: its exit status, or 1 when it raises the stage's
    `fails` (a backend that cannot be loaded)."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return asyncio.run(serving)
    except fails as exc:
        log.error("could not start the %s stage: %s", stage, exc)
        return 1


async def serve(
    args: argparse.Namespace,
    loading: Awaitable[B],
    app_for: Callable[[B, str], ASGIApp],
    *,
    stage: str,
    log: logging.Logger,
    about: Callable[[B], str] = lambda backend: f"model {backend.model}",
) -> int:
    """Load the backend (`loading`, timed and logged: `about` says what was loaded), build its app under the served
    name (`app_for(backend, name)`) and serve it on `args.host` and `args.port` until the server stops, what the
    process then holds kept out of the garbage collector's walks (`stage_protocol.server.collector`)."""
    import uvicorn

    started = time.perf_counter()
    log.info("loading %s backend %r ...", stage, args.backend)
    backend = await loading
    log.info("loaded %s backend %r (%s) in %.2f s", stage, backend.name, about(backend), time.perf_counter() - started)
    name = args.served_model_name or backend.model
    app = app_for(backend, name)
    log.info("serving %r on http://%s:%d/v1", name, args.host, args.port)
    keep_large_buffers_in_heap()
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, **UVICORN_OPTIONS)
    with frozen_heap():  # the backend and its models live as long as the server
        await uvicorn.Server(config).serve()
    return 0
