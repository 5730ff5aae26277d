"""The body limit of a stage server, as ASGI middleware."""

from __future__ import annotations

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from stage_protocol.body_limit import capped, declared_length, too_large_message
from stage_protocol.server.errors import REQUEST_TOO_LARGE, Failure


class BodyLimit:
    """ASGI middleware refusing a body over `max_body_bytes` with an OpenAI-shaped 413: a declared Content-Length
    before anything is read, a chunked body as soon as it grows past the limit (through the handler of
    Starlette's `HTTPException`). FastAPI's own `max_body_size` answers the first case in plain text."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = declared_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            failure = Failure(REQUEST_TOO_LARGE, too_large_message(declared, self.max_body_bytes))
            await failure.response()(scope, receive, send)
            return
        await self.app(scope, capped(receive, self.max_body_bytes, _http_413), send)


def _http_413(message: str) -> Exception:
    return StarletteHTTPException(413, message)
