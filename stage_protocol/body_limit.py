"""Body limits for ASGI apps: what both the orchestrator and the stage servers cap a request body with.

`declared_length` reads a request's `Content-Length` (to refuse before reading); `capped` wraps `receive` so that a
body growing past the limit (a chunked one, or one longer than it declared) raises the caller's error as soon as it
does. The stage servers' middleware over both is `stage_protocol.server.body_limit.BodyLimit`.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.types import Message, Receive, Scope


def declared_length(scope: Scope) -> int | None:
    """The request's `Content-Length`, when it declares a readable one."""
    declared = Headers(scope=scope).get("content-length", "")
    return int(declared) if declared.isdigit() else None


def capped(receive: Receive, max_bytes: int, too_large: Callable[[str], Exception]) -> Receive:
    """`receive`, raising `too_large(message)` once the body read so far is over `max_bytes`."""
    seen = 0

    async def capped_receive() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > max_bytes:
                raise too_large(f"the body is larger than the limit of {max_bytes} bytes")
        return message

    return capped_receive


def too_large_message(declared: int, max_bytes: int) -> str:
    return f"the body has {declared} bytes; the limit is {max_bytes}"
