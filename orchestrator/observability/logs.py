"""Structured logs: one JSON object per line, with the request id of the request being served on every line.

    {"time": "2026-11-24T07:01:02.345Z", "level": "WARNING", "logger": "orchestrator.analysis.pipeline",
     "message": "reasoning stage failed …", "request_id": "3f2a…"}

The request id lives in a context variable (`request_id`), set by the request middleware for the request's task and
everything it starts (worker threads included), and sent on to the remote stages as `X-Request-ID`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

_ACCEPTED_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def accepted_request_id(header: str | None) -> str:
    """A client's `X-Request-ID` when it is a sane token (1–128 letters, digits, `._:-`), else a fresh one."""
    if header is not None and _ACCEPTED_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


def stage_headers() -> dict[str, str]:
    """Headers for a call to a remote stage made while serving a request: its id."""
    current = request_id.get()
    return {"X-Request-ID": current} if current else {}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": request_id.get(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str, fmt: str) -> None:
    """Logs to stderr: `json` (one object per line) or `text`."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
