"""The body limit of a stage server, as ASGI middleware."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            message = f"the body has {declared} bytes; the limit is {self.max_body_bytes}"
            await Failure(REQUEST_TOO_LARGE, message).response()(scope, receive, send)
            return
        await self.app(scope, self._capped(receive), send)

    def _capped(self, receive: Receive) -> Receive:
        seen = 0

        async def capped_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b"")) if message["type"] == "http.request" else 0
            if seen > self.max_body_bytes:
                raise StarletteHTTPException(413, f"the body is larger than the limit of {self.max_body_bytes} bytes")
            return message

        return capped_receive
