"""Raw-byte HTTP servers on loopback for the stage-protocol client's tests (`asyncio.start_server`, so the framing is
exactly what each test writes), the request and the event stream they answer with, and the clients under test."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Literal

import httpx
import orjson

from stage_protocol.client import (
    ChatClient,
    Chunk,
    StageHttpError,
)
from stage_protocol.client.transport import AiohttpTransport, HttpxTransport

BODY: dict[str, object] = {
    "model": "m",
    "messages": [{"role": "user", "content": "Où est le total ? 🧾"}],
    "stream": True,
    "max_tokens": 16,
}


def event(delta: Mapping[str, object] | None = None, finish: str | None = None) -> dict[str, object]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}


EVENTS: list[dict[str, object]] = [
    event({"role": "assistant", "content": ""}),
    event({"reasoning_content": "Hmm… 🤔"}),
    event({"content": "Héllo "}),
    event({"content": "wörld 🌍"}),
    event(finish="stop"),
    {"object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 5}},
]
EXPECTED = [
    Chunk(choice=True),
    Chunk(choice=True, reasoning="Hmm… 🤔"),
    Chunk(choice=True, content="Héllo "),
    Chunk(choice=True, content="wörld 🌍"),
    Chunk(choice=True, finish_reason="stop"),
    Chunk(choice=False, usage=(12, 5)),
]
DONE = b"data: [DONE]\n\n"


def sse(*events: object, done: bool = True) -> bytes:
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + (DONE if done else b"")


STREAM = sse(*EVENTS)

# A raw HTTP/1.1 server on loopback


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: dict[str, str]
    """Names in lower case."""
    body: bytes
    connection: int
    """Which accepted connection it came on, from 1."""
    index: int
    """Its place on that connection, from 0."""


@dataclass(frozen=True)
class Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, *writes: bytes, pause_s: float = 0.0) -> None:
        """Each of `writes` as its own TCP write, `pause_s` apart (so that the client reads them one by one)."""
        for index, data in enumerate(writes):
            if index and pause_s:
                await asyncio.sleep(pause_s)
            self.writer.write(data)
            await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()

    async def wait_for_client_to_leave(self) -> None:
        await self.reader.read()


Handler = Callable[[Request, Conn], Awaitable[None]]


class RawServer:
    """Reads requests (head, then a `content-length` body) one after the other on each connection and hands each to
    `handler`, which writes whatever bytes it likes; records the requests, the connections accepted and those the
    client closed."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[Request] = []
        self.accepted = 0
        self.left = 0
        """Connections the client closed (end of file or reset while the server waited for it)."""
        self.tasks: set[asyncio.Task[object]] = set()
        self.writers: list[asyncio.StreamWriter] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        number = self.accepted
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.writers.append(writer)
        conn = Conn(reader, writer)
        try:
            for index in itertools.count():
                request = await read_request(reader, number, index)
                if request is None:
                    self.left += 1
                    return
                self.requests.append(request)
                await self.handler(request, conn)
                if writer.is_closing():
                    return
        except ConnectionError:
            self.left += 1
        finally:
            writer.close()


async def read_request(reader: asyncio.StreamReader, connection: int, index: int) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    request_line, *lines = head.decode("latin-1").removesuffix("\r\n\r\n").split("\r\n")
    method, target, _ = request_line.split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        assert name.lower() not in headers, f"header {name} sent twice"
        headers[name.lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Request(method, target, headers, body, connection, index)


@asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[RawServer]:
    raw = RawServer(handler)
    server = await asyncio.start_server(raw.connection, "127.0.0.1", 0)
    raw.port = server.sockets[0].getsockname()[1]
    try:
        yield raw
    finally:
        server.close()
        for writer in raw.writers:  # ends every handler still waiting for the client (never cancelled: 3.11's
            writer.transport.abort()  # streams log a cancelled connection task as an error)
        if raw.tasks:
            await asyncio.wait(raw.tasks, timeout=5)
        await server.wait_closed()


Framing = Literal["length", "chunked", "close"]


def head(
    status: int = 200,
    *,
    content_type: str | None = "text/event-stream",
    length: int | None = None,
    chunked: bool = False,
    headers: Mapping[str, str] | None = None,
) -> bytes:
    lines = [f"HTTP/1.1 {status} Whatever"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def response(
    body: bytes = STREAM,
    status: int = 200,
    *,
    content_type: str | None = "text/event-stream",
    headers: Mapping[str, str] | None = None,
) -> bytes:
    return head(status, content_type=content_type, length=len(body), headers=headers) + body


def chunked(body: bytes, cuts: Iterable[int] = (), *, end: bool = True) -> bytes:
    """`body` in the chunked transfer coding, a chunk boundary at each of `cuts`."""
    bounds = [0, *sorted(cuts), len(body)]
    parts = [body[start:stop] for start, stop in itertools.pairwise(bounds) if stop > start]
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + (b"0\r\n\r\n" if end else b"")


def cut(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[start:stop] for start, stop in itertools.pairwise(bounds) if stop > start]


def replying(answer: Callable[[Request], bytes]) -> Handler:
    async def handle(request: Request, conn: Conn) -> None:
        await conn.send(answer(request))

    return handle


def always(data: bytes) -> Handler:
    return replying(lambda _: data)


async def eventually(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    """Wait until `condition` holds (what the server sees lags what the client did by a loop iteration or two)."""
    deadline = time.monotonic() + timeout_s
    for _ in itertools.count():
        if condition():
            return
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.005)


async def collect(client: ChatClient, headers: Mapping[str, str] | None = None) -> list[Chunk]:
    return [chunk async for chunk in client.chunks(BODY, headers)]


async def collect_until_error(client: ChatClient) -> tuple[list[Chunk], StageHttpError]:
    got: list[Chunk] = []
    try:
        async for chunk in client.chunks(BODY):
            got.append(chunk)
    except StageHttpError as error:
        return got, error
    raise AssertionError(f"no StageHttpError after {got}")


def plain(base_url: str, *, connect_timeout_s: float = 5.0, first_byte_timeout_s: float = 60.0) -> aclosing[ChatClient]:
    client = ChatClient(base_url, connect_timeout_s=connect_timeout_s, first_byte_timeout_s=first_byte_timeout_s)
    return aclosing(client)


@asynccontextmanager
async def client_for(transport: str, base_url: str, *, first_byte_timeout_s: float = 60.0) -> AsyncIterator[ChatClient]:
    """A client of `base_url` through `AiohttpTransport` ("aiohttp") or an injected `httpx.AsyncClient` ("httpx")."""
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(httpx.AsyncClient(trust_env=False)) if transport == "httpx" else None
        client = ChatClient(base_url, http_client=http, first_byte_timeout_s=first_byte_timeout_s)
        assert isinstance(client._transport, HttpxTransport if http else AiohttpTransport)
        yield await stack.enter_async_context(aclosing(client))


TRANSPORTS = ["aiohttp", "httpx"]


async def silent(request: Request, conn: Conn) -> None:
    await conn.wait_for_client_to_leave()


async def head_then_silent(request: Request, conn: Conn) -> None:
    await conn.send(head(chunked=True))
    await conn.wait_for_client_to_leave()


async def one_event_then_silent(request: Request, conn: Conn) -> None:
    await conn.send(head(chunked=True) + chunked(sse(EVENTS[0], done=False), end=False))
    await conn.wait_for_client_to_leave()


def one_by_one(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]
