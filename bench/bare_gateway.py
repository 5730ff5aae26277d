"""The smallest gateway on the service's own server and client stack, in its own process: `python -m
bench.bare_gateway PORT STAGE_URL`. The gateway benchmark (`bench/overhead_vs_litellm.py --gateways bare`) runs it
beside ours and LiteLLM to show the floor: what one more HTTP hop costs before a gateway does anything.

It is a bare ASGI app under uvicorn as the service runs it (`UVICORN_OPTIONS`, its heap setting, uvloop and
httptools, log level warning) that sends each `POST /v1/chat/completions` body, unread and unchanged, to `STAGE_URL`
over one pooled aiohttp session with aiohttp's defaults (the library the service's stage client is built on, not
its tuned transport) and answers with the stage's status, content type and body. No validation, no image check,
no routing, no streaming, no middleware: nothing a user would deploy, only the hop.
"""

from __future__ import annotations

import argparse

import aiohttp
import uvicorn
from starlette.types import Message, Receive, Scope, Send

from stage_protocol.server.command import UVICORN_OPTIONS, keep_large_buffers_in_heap

CHAT = "/v1/chat/completions"


class BareGateway:
    def __init__(self, stage_url: str) -> None:
        self.stage_url = stage_url.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        body = await read_body(receive)
        if scope["method"] == "GET" and scope["path"] == "/health":
            await answer(send, 200, b"application/json", b'{"status": "ok"}')
            return
        if (scope["method"], scope["path"]) != ("POST", CHAT) or self.session is None:
            await answer(send, 404, b"application/json", b'{"error": {"message": "not found"}}')
            return
        headers = {"content-type": "application/json"}
        async with self.session.post(f"{self.stage_url}{CHAT}", data=body, headers=headers) as response:
            payload = await response.read()
            kind = response.headers.get("content-type", "application/json").encode("latin-1")
            await answer(send, response.status, kind, payload)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def read_body(receive: Receive) -> bytes:
    parts: list[bytes] = []
    while True:
        message: Message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


async def answer(send: Send, status: int, kind: bytes, payload: bytes) -> None:
    headers = [(b"content-type", kind), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int, help="the port to serve on (127.0.0.1)")
    parser.add_argument("stage_url", help="where to send each body, e.g. http://127.0.0.1:9000")
    args = parser.parse_args(argv)
    keep_large_buffers_in_heap()
    uvicorn.run(BareGateway(args.stage_url), host="127.0.0.1", port=args.port, log_level="warning", **UVICORN_OPTIONS)


if __name__ == "__main__":
    main()
