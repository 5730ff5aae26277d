"""The fake OpenAI-compatible stage of the gateway benchmark (`bench/overhead_vs_litellm.py`), in its own process:
`python -m bench.fake_stage PORT`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import subprocess
import sys
from pathlib import Path

STAGE_ANSWER = "A small test image."


def _event(payload: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


class Stage:
    """The smallest OpenAI-compatible server that does the job, on asyncio streams (HTTP/1.1, keep-alive,
    `Content-Length` bodies): `POST /v1/chat/completions` answers `STAGE_ANSWER`, as one JSON completion or, when the
    body asks `"stream": true`, as an event stream (content, finish, usage, `[DONE]`); `GET /v1/models` lists `m`;
    `GET /bench/calls` counts the chat requests so far; `GET /bench/last` describes the last one. It parses no body:
    it looks for the stream flag in a body's first and last 4 KiB, where clients put it (the image sits in between),
    since parsing 1.4 MB of JSON would cost the core it shares with the load generator ~1-3 ms a request."""

    def __init__(self) -> None:
        head = {"id": "chatcmpl-bench", "created": 1764048000, "model": "m"}
        usage = {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}
        message = {"index": 0, "message": {"role": "assistant", "content": STAGE_ANSWER}, "finish_reason": "stop"}
        chunk = head | {"object": "chat.completion.chunk"}
        self.completion = json.dumps(
            head | {"object": "chat.completion", "choices": [message], "usage": usage}
        ).encode()
        self.stream = b"".join(
            [
                _event(chunk | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": STAGE_ANSWER}}]}),
                _event(chunk | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
                _event(chunk | {"choices": [], "usage": usage}),
                b"data: [DONE]\n\n",
            ]
        )
        self.models = json.dumps(
            {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "bench"}]}
        ).encode()
        self.last = b"{}"
        self.calls = 0

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, bytes, bytes]:
        if (method, path) == ("POST", "/v1/chat/completions"):
            self.last, self.calls = body, self.calls + 1
            if any(_streams(window) for window in (body[:4096], body[-4096:])):
                return 200, b"text/event-stream", self.stream
            return 200, b"application/json", self.completion
        if (method, path) == ("GET", "/v1/models"):
            return 200, b"application/json", self.models
        if (method, path) == ("GET", "/bench/calls"):
            return 200, b"application/json", str(self.calls).encode()
        if (method, path) == ("GET", "/bench/last"):
            return 200, b"application/json", json.dumps(describe_request(self.last)).encode()
        return 404, b"application/json", b'{"error": {"message": "not found"}}'

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            while True:
                lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {
                    name.strip().lower(): value.strip() for name, _, value in (x.partition(":") for x in lines[1:])
                }
                body = await reader.readexactly(int(headers.get("content-length") or 0))
                status, kind, payload = self.answer(method, path, body)
                head = f"HTTP/1.1 {status} -\r\ncontent-type: {kind.decode()}\r\ncontent-length: {len(payload)}\r\n\r\n"
                writer.write(head.encode() + payload)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        writer.close()


def _streams(window: bytes) -> bool:
    at = window.find(b'"stream"')
    return at >= 0 and window[at + 8 : at + 16].lstrip(b" :").startswith(b"true")


def describe_request(raw: bytes) -> dict[str, object]:
    """What a chat request carried: its size and hash, its top-level fields, whether it streamed, its image's size."""
    body = json.loads(raw)
    parts = [
        part for message in body.get("messages", []) for part in message.get("content") or [] if isinstance(part, dict)
    ]
    urls = [str(part.get("image_url", {}).get("url", "")) for part in parts if part.get("type") == "image_url"]
    return {
        "bytes": len(raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "fields": sorted(body),
        "stream": body.get("stream") is True,
        "image_url_chars": [len(u) for u in urls],
    }


async def serve_stage(port: int) -> None:
    stage = Stage()
    server = await asyncio.start_server(stage.connection, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def start(core: int, logs: Path) -> tuple[subprocess.Popen[bytes], int]:
    """This stage in a process of its own, pinned to `core`, its output in `logs`, once it answers: the process and
    its port. Stopping it is the caller's (`bench.processes.stop`)."""
    from bench.processes import base_env, free_port, spawn, stop, wait_ready

    port = free_port()
    process, log = spawn("stage", [sys.executable, "-m", "bench.fake_stage", str(port)], base_env(), core, logs)
    try:
        wait_ready("stage", process, f"http://127.0.0.1:{port}/v1/models", log, 60.0)
    except BaseException:
        stop(process)
        raise
    return process, port


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.fake_stage", description=__doc__)
    parser.add_argument("port", type=int, help="the port to serve on (127.0.0.1)")
    asyncio.run(serve_stage(parser.parse_args().port))
