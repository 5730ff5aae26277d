"""`stage_protocol` on its own: `AiohttpTransport` against raw-byte servers on loopback (`asyncio.start_server`, so
the framing is exactly what each test writes), `HttpxTransport` through `httpx.MockTransport` and over loopback.

What the stage backends' tests (`test_remote_backends`, `test_faulty_server`) do not reach: keep-alive and the pool,
HTTP framing, the event-stream parser's corners, the timeouts' two owners (ours become `StageTimedOut`, the caller's
stay `TimeoutError`), the request on the wire, `classify`, and uvloop.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Literal

import httpx
import orjson
import pytest
import uvloop

from stage_protocol.client import (
    ChatClient,
    Chunk,
    Failure,
    StageErrorEvent,
    StageHttpError,
    StageMalformed,
    StageStatus,
    StageTimedOut,
    StageUnreachable,
    classify,
    retry_after_s,
)
from stage_protocol.client import errors as errors_module
from stage_protocol.client import transport as transport_module
from stage_protocol.client.chat import MAX_ERROR_BODY_BYTES, MAX_EVENT_BYTES
from stage_protocol.client.transport import AiohttpTransport, HttpxTransport
from tests.servers import unused_port

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


# --- both transports, and uvloop --------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_both_transports_stream_the_same_chunks_over_one_kept_alive_connection(transport: str) -> None:
    async with serve(always(response())) as server, client_for(transport, f"{server.url}/v1") as client:
        for _ in range(3):
            assert await collect(client) == EXPECTED
        assert [r.target for r in server.requests] == ["/v1/chat/completions"] * 3
        assert server.accepted == 1


def test_the_aiohttp_transport_works_on_uvloop() -> None:
    """Production runs on uvloop, whose transports are not asyncio's classes; pytest's loop is plain asyncio."""

    async def scenario() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)

        async def handle(request: Request, conn: Conn) -> None:
            if request.body == b'{"hang":true}':
                await conn.wait_for_client_to_leave()
            elif request.body == b'{"abandon":true}':
                await conn.send(head(chunked=True) + chunked(sse(EVENTS[0], done=False), end=False))
                await conn.wait_for_client_to_leave()
            elif (request.connection, request.index) == (1, 1):  # closed as the request arrives, once
                await conn.close()
            else:
                await conn.send(head(chunked=True), chunked(STREAM, range(0, len(STREAM), 50)), pause_s=0.002)

        async with serve(handle) as server, plain(f"{server.url}/v1", first_byte_timeout_s=0.3) as client:
            assert await collect(client) == EXPECTED  # connection 1
            assert await collect(client) == EXPECTED  # connection 1 closes unanswered: retried on connection 2
            async with aclosing(client.chunks({"abandon": True})) as stream:  # connection 2 again, abandoned: closed
                assert await anext(stream) == EXPECTED[0]
            await eventually(lambda: server.left == 1)
            assert await collect(client) == EXPECTED  # connection 3
            assert server.accepted == 3
            started = time.monotonic()
            with pytest.raises(StageTimedOut):  # connection 3 again
                await anext(aiter(client.chunks({"hang": True})))
            assert time.monotonic() - started < 2
            await eventually(lambda: server.left == 2)
        assert [(r.connection, r.index) for r in server.requests] == [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]

    uvloop.run(scenario())


def test_plain_http_goes_through_aiohttp_and_https_through_httpx_unless_named() -> None:
    assert isinstance(ChatClient("https://stage.example/v1")._transport, HttpxTransport)
    assert isinstance(ChatClient("http://stage.example/v1")._transport, AiohttpTransport)
    assert isinstance(ChatClient("http://stage.example/v1", transport="httpx")._transport, HttpxTransport)
    assert isinstance(ChatClient("https://stage.example/v1", transport="aiohttp")._transport, AiohttpTransport)
    injected = ChatClient("http://stage.example/v1", http_client=httpx.AsyncClient())
    assert isinstance(injected._transport, HttpxTransport)


async def test_an_https_base_url_speaks_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    first_bytes: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first_bytes.append(await reader.read(3))
        writer.close()

    server = await asyncio.start_server(record, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, plain(f"https://127.0.0.1:{port}/v1", connect_timeout_s=2) as client:
        with pytest.raises(StageUnreachable, match="could not be reached"):
            await collect(client)
    assert len(first_bytes) == 1
    assert first_bytes[0].startswith(b"\x16\x03")  # a TLS handshake record, not "POST"


# --- keep-alive and the pool ------------------------------------------------------------------------------------------


async def test_a_stream_closed_early_gives_its_connection_up_and_leaks_nothing() -> None:
    async def handle(request: Request, conn: Conn) -> None:
        if request.body == b'{"abandon":true}':  # the first event, then nothing more until the client leaves
            await conn.send(head(chunked=True) + chunked(sse(EVENTS[0], done=False), end=False))
        else:
            await conn.send(response())

    async with serve(handle) as server:
        async with plain(f"{server.url}/v1") as client:
            assert await collect(client) == EXPECTED
            async with aclosing(client.chunks({"abandon": True})) as stream:
                assert await anext(stream) == EXPECTED[0]
            await eventually(lambda: server.left == 1)  # the client closed the connection it left mid-answer
            assert await collect(client) == EXPECTED
            assert server.accepted == 2
            assert [r.connection for r in server.requests] == [1, 1, 2]
        await eventually(lambda: server.left == 2)  # aclose closed the pooled one


async def test_concurrent_streams_open_one_connection_each_and_the_pool_serves_them_all_again() -> None:
    async with serve(always(response())) as server, plain(f"{server.url}/v1") as client:
        for _ in range(3):
            assert await asyncio.gather(*(collect(client) for _ in range(4))) == [EXPECTED] * 4
        assert server.accepted == 4
        assert len(server.requests) == 12


async def test_an_error_response_read_to_its_end_keeps_the_connection() -> None:
    async def handle(request: Request, conn: Conn) -> None:
        body = orjson.dumps({"error": {"message": "busy", "code": 503}})
        await conn.send(response(STREAM) if request.index % 2 else response(body, 503, content_type="application/json"))

    async with serve(handle) as server, plain(f"{server.url}/v1") as client:
        for _ in range(2):
            with pytest.raises(StageStatus, match="busy"):
                await collect(client)
            assert await collect(client) == EXPECTED
        assert server.accepted == 1


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_what_follows_done_is_read_so_that_the_connection_serves_the_next_request(framing: Framing) -> None:
    after = b": trailing comment\n\ndata: not json at all\n\n" + b"x" * 5000 + b"\n\n"
    body = STREAM + after
    before, rest = (
        (head(length=len(body)) + STREAM, after)
        if framing == "length"
        else (head(chunked=True) + chunked(STREAM, end=False), chunked(after))
    )

    async def handle(request: Request, conn: Conn) -> None:
        await conn.send(before, rest, pause_s=0.03)  # the rest of the body well after [DONE]

    async with serve(handle) as server, plain(f"{server.url}/v1") as client:
        for _ in range(3):
            assert await collect(client) == EXPECTED
        assert server.accepted == 1


async def test_an_interim_response_is_skipped_and_the_final_one_read() -> None:
    async def handle(request: Request, conn: Conn) -> None:
        interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
        await conn.send(interim, response(), pause_s=0.02)

    async with serve(handle) as server, plain(f"{server.url}/v1") as client:
        for _ in range(2):
            assert await collect(client) == EXPECTED
        assert server.accepted == 1, "the connection stays in step: the next request gets its own answer"


async def test_a_connection_that_sends_more_than_the_response_is_not_pooled() -> None:
    async def handle(request: Request, conn: Conn) -> None:
        await conn.send(response() + response(b"a stray second response"))

    async with serve(handle) as server, plain(f"{server.url}/v1") as client:
        for _ in range(2):
            assert await collect(client) == EXPECTED
        assert [(r.connection, r.index) for r in server.requests] == [(1, 0), (2, 0)]


async def test_requests_beyond_the_connection_bound_wait_for_a_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport_module, "MAX_CONNECTIONS", 2)

    async def handle(request: Request, conn: Conn) -> None:
        await asyncio.sleep(0.02)  # all five are in flight at once
        await conn.send(response())

    async with serve(handle) as server, plain(f"{server.url}/v1") as client:
        assert await asyncio.gather(*(collect(client) for _ in range(5))) == [EXPECTED] * 5
        assert server.accepted == 2


async def test_idle_connections_are_closed_after_the_keep_alive_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport_module, "KEEPALIVE_S", 0.2)
    async with serve(always(response())) as server, plain(f"{server.url}/v1") as client:
        assert await collect(client) == EXPECTED
        await eventually(lambda: server.left == 1)  # closed by the client, well before uvicorn's 5 s
        assert await collect(client) == EXPECTED
        assert server.accepted == 2


async def test_a_response_announcing_connection_close_is_not_pooled() -> None:
    """The server says it will close but keeps the socket open: the client must close it and not send on it."""
    async with (
        serve(always(response(headers={"Connection": "close"}))) as server,
        plain(f"{server.url}/v1") as client,
    ):
        assert await collect(client) == EXPECTED
        assert await collect(client) == EXPECTED
        assert [(r.connection, r.index) for r in server.requests] == [(1, 0), (2, 0)]
        await eventually(lambda: server.left == 2)


async def test_a_pooled_connection_the_server_closed_while_idle_is_replaced() -> None:
    """The server closes an idle keep-alive connection without having announced it; the client has noticed the
    close by the time of its next call, and opens a new connection."""

    async def handle(request: Request, conn: Conn) -> None:
        await conn.send(response())
        await asyncio.sleep(0.01)
        await conn.close()

    async with serve(handle) as server, plain(f"{server.url}/v1") as client:
        assert await collect(client) == EXPECTED
        await eventually(lambda: len(server.tasks) == 1 and all(task.done() for task in server.tasks))
        await asyncio.sleep(0.05)  # the client's loop reads the end of file and closes its side
        assert await collect(client) == EXPECTED
        assert await collect(client) == EXPECTED
        assert server.accepted == 3


def answered_once_then(partial: bytes) -> Handler:
    """The first request on a connection is answered; a later one gets `partial`, then the connection closes."""

    async def handle(request: Request, conn: Conn) -> None:
        if request.index == 0:
            await conn.send(response())
        else:
            await conn.send(partial)
            await conn.close()

    return handle


@pytest.mark.parametrize("partial", [b"", b"HTTP/1.1 200 OK\r\nContent-Ty"], ids=["nothing", "mid-head"])
async def test_a_pooled_connection_closed_as_the_request_arrives_is_retried_once_on_a_new_one(partial: bytes) -> None:
    """The race the pool cannot see coming: the server closes the idle connection just as the next request goes
    out on it. No response head came, so the request is sent again, on a new connection."""

    async with serve(answered_once_then(partial)) as server, plain(f"{server.url}/v1") as client:
        assert await collect(client) == EXPECTED
        assert await collect(client) == EXPECTED
        assert [(r.connection, r.index) for r in server.requests] == [(1, 0), (1, 1), (2, 0)]
        assert server.requests[1].body == server.requests[2].body == orjson.dumps(BODY)


async def test_a_new_connection_closed_before_any_answer_raises_without_retrying() -> None:
    async def handle(request: Request, conn: Conn) -> None:
        if request.connection == 1 and request.index == 0:
            await conn.send(response())
        else:
            await conn.close()

    async with serve(handle) as server, plain(f"{server.url}/v1") as client:
        with_pool = await collect(client)
        assert with_pool == EXPECTED
        # the pooled connection fails, then the new one: one retry, then the error
        with pytest.raises(StageUnreachable, match="could not be reached"):
            await collect(client)
        assert server.accepted == 2
        # no pooled connection: the new one fails, no retry
        with pytest.raises(StageUnreachable, match="could not be reached"):
            await collect(client)
        assert server.accepted == 3
        assert len(server.requests) == 4


async def test_a_reused_connection_that_breaks_after_part_of_the_body_is_not_retried() -> None:
    """Part of the answer came: the server did take the request, so sending it again could do the work twice."""
    partial = head(length=len(STREAM)) + STREAM[:40]

    async with serve(answered_once_then(partial)) as server, plain(f"{server.url}/v1") as client:
        assert await collect(client) == EXPECTED
        with pytest.raises(StageUnreachable, match="before the response was complete"):
            await collect(client)
        assert server.accepted == 1
        assert len(server.requests) == 2


async def test_a_slow_reader_of_a_big_stream_gets_every_byte_and_keeps_the_connection() -> None:
    """More than the flow-control threshold arrives while the caller is busy: reading pauses, then resumes."""
    pieces = [f"{i:07d}" + "é" * 8000 for i in range(400)]  # ~6.4 MB of content
    stream = sse(*(event({"content": piece}) for piece in pieces), event(finish="length"))

    async with serve(always(response(stream))) as server, plain(f"{server.url}/v1") as client:
        for _ in range(2):
            got: list[str] = []
            async for chunk in client.chunks(BODY):
                if not got:
                    await asyncio.sleep(0.1)
                got.append(chunk.content)
            assert got == [*pieces, ""]
        assert server.accepted == 1


# --- framing ----------------------------------------------------------------------------------------------------------


def awkward_cuts(body: bytes) -> list[int]:
    """Chunk boundaries or TCP writes: inside a 4-byte and a 2-byte UTF-8 character, inside `data:`, between the two
    newlines that end an event, and inside the `[DONE]` line."""
    return [
        body.index("🌍".encode()) + 2,
        body.index("é".encode()) + 1,
        body.index(b"data:", 100) + 3,
        body.index(b"\n\n", 200) + 1,
        body.index(b"[DONE]") + 2,
    ]


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
async def test_every_framing_delivers_the_same_chunks_however_the_bytes_are_split(framing: Framing) -> None:
    cuts = awkward_cuts(STREAM)
    if framing == "length":
        data = head(length=len(STREAM)) + STREAM
    elif framing == "chunked":
        data = head(chunked=True) + chunked(STREAM, cuts)
    else:
        data = head() + STREAM
    offset = len(data) - len(STREAM)  # the body's start (the chunked framing shifts it: cut anywhere then)
    writes = cut(data, [*range(0, len(data), 97), *(offset + c for c in cuts)])

    async def handle(request: Request, conn: Conn) -> None:
        await conn.send(*writes, pause_s=0.002)
        if framing == "close":
            await conn.close()

    async with serve(handle) as server, plain(f"{server.url}/v1") as client:
        assert await collect(client) == EXPECTED
        assert await collect(client) == EXPECTED
        assert server.accepted == (2 if framing == "close" else 1)


@pytest.mark.parametrize(
    "data",
    [head(chunked=True) + chunked(STREAM, awkward_cuts(STREAM), end=False), head(length=len(STREAM) + 10) + STREAM],
    ids=["chunked-without-last-chunk", "shorter-than-content-length"],
)
async def test_a_body_cut_short_raises_unreachable_after_the_chunks_it_held(data: bytes) -> None:
    async def handle(request: Request, conn: Conn) -> None:
        await conn.send(data)
        await conn.close()

    async with serve(handle) as server, plain(f"{server.url}/v1") as client:
        got, error = await collect_until_error(client)
        assert got == EXPECTED
        assert isinstance(error, StageUnreachable)
        assert "before the response was complete" in str(error)
        assert classify(error).kind == "unavailable"


async def test_an_answer_that_is_not_http_is_malformed() -> None:
    async def handle(request: Request, conn: Conn) -> None:
        await conn.send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")

    async with serve(handle) as server, plain(f"{server.url}/v1") as client:
        with pytest.raises(StageMalformed, match=r"not HTTP/1\.1"):
            await collect(client)


@pytest.mark.parametrize(
    "pause_s",
    [0.0, 0.05],
    ids=["same-write", "later-write"],
)
async def test_a_body_that_stops_being_http_midway_is_malformed(pause_s: float) -> None:
    good = head(chunked=True) + chunked(sse(EVENTS[0], done=False), end=False)
    garbage = b"zz\r\nnot a chunk\r\n"

    async def handle(request: Request, conn: Conn) -> None:
        await conn.send(*([good, garbage] if pause_s else [good + garbage]), pause_s=pause_s)

    async with serve(handle) as server, plain(f"{server.url}/v1", first_byte_timeout_s=0.5) as client:
        started = time.monotonic()
        got, error = await collect_until_error(client)
    # aiohttp drops what it had buffered when the framing breaks in the same read; nothing after the break arrives
    assert got == (EXPECTED[:1] if pause_s else [])
    assert isinstance(error, StageMalformed)
    assert "not HTTP/1.1" in str(error)
    assert time.monotonic() - started < 2  # aiohttp leaves the reader waiting: the read's bound ends the wait


# --- the event stream -------------------------------------------------------------------------------------------------


@asynccontextmanager
async def mocked(*pieces: bytes, content_type: str = "text/event-stream") -> AsyncIterator[ChatClient]:
    """A client whose every chat request is answered 200 with `pieces`, each arriving on its own."""

    async def stream() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": content_type}, content=stream())

    async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as http:
        yield ChatClient("http://stage.test/v1", http_client=http)


async def parsed(*pieces: bytes) -> list[Chunk]:
    async with mocked(*pieces) as client:
        return await collect(client)


async def parsed_until_error(*pieces: bytes) -> tuple[list[Chunk], StageHttpError]:
    async with mocked(*pieces) as client:
        return await collect_until_error(client)


def one_by_one(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("split", ["whole", "bytes"])
async def test_line_endings_and_any_split_give_the_same_chunks(newline: bytes, split: str) -> None:
    data = STREAM.replace(b"\n", newline)
    assert await parsed(*(one_by_one(data) if split == "bytes" else [data])) == EXPECTED


async def test_comments_and_other_fields_are_skipped_and_data_lines_are_joined() -> None:
    data = (
        b": ping\n\n"
        b"id: 1\nretry: 1000\nevent: message\n"
        b'data:{"choices":[{"delta":{"content":"a"}}]}\n\n'  # no space after the colon
        b'data: {"choices":\n'
        b": a comment inside an event\n"
        b'data: [{"delta":{"content":"b"},\n'
        b'data: "finish_reason":"stop"}]}\n\n'
        b": ping\n\n" + DONE
    )
    assert await parsed(data) == [Chunk(True, content="a"), Chunk(True, content="b", finish_reason="stop")]


@pytest.mark.parametrize("split", ["whole", "bytes"])
async def test_a_byte_order_mark_before_the_stream_is_skipped(split: str) -> None:
    data = b"\xef\xbb\xbf" + STREAM
    assert await parsed(*(one_by_one(data) if split == "bytes" else [data])) == EXPECTED


async def test_an_event_of_many_data_lines_is_bounded_like_one_long_line() -> None:
    line = b"data: " + b"x" * (64 * 1024) + b"\n"
    got, error = await parsed_until_error(*([line] * (MAX_EVENT_BYTES // len(line) + 2)))
    assert got == []
    assert isinstance(error, StageMalformed)
    assert "event of more than" in str(error)


@pytest.mark.parametrize("ending", [b"", b"\n", b"\r", b"\r\n"], ids=["none", "lf", "cr", "crlf"])
async def test_a_last_event_without_its_blank_line_is_still_delivered(ending: bytes) -> None:
    data = sse(EVENTS[2], done=False) + b"data: " + orjson.dumps(event(finish="stop")) + ending
    assert await parsed(data) == [EXPECTED[2], EXPECTED[4]]


async def test_nothing_after_done_is_parsed() -> None:
    assert await parsed(STREAM + b"data: not json\n\n" + sse(EVENTS[2])) == EXPECTED


async def test_a_line_longer_than_the_event_limit_is_malformed_without_reading_on() -> None:
    pulled = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal pulled
        yield b'data: {"choices":[{"delta":{"content":"'
        for _ in range(1000):  # 1 GB if it were all read
            pulled += 1
            yield b"a" * (1024 * 1024)

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=endless())

    async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as http:
        client = ChatClient("http://stage.test/v1", http_client=http)
        with pytest.raises(StageMalformed, match=f"a line of more than {MAX_EVENT_BYTES} bytes"):
            await collect(client)
    assert pulled <= MAX_EVENT_BYTES // (1024 * 1024) + 1


@pytest.mark.parametrize("data", [b"", DONE, b": ping\n\n" + DONE, b"\n\n\n"])
async def test_a_stream_without_any_chunk_is_malformed(data: bytes) -> None:
    with pytest.raises(StageMalformed, match="empty stream"):
        await parsed(data)


@pytest.mark.parametrize("done", [True, False])
async def test_a_stream_without_a_finish_reason_is_cut_off_after_the_chunks_it_held(done: bool) -> None:
    got, error = await parsed_until_error(sse(*EVENTS[:4], done=done))
    assert got == EXPECTED[:4]
    assert isinstance(error, StageMalformed)
    assert "cut off" in str(error)
    assert classify(error).kind == "invalid"


@pytest.mark.parametrize(
    ("data", "body", "kind"),
    [
        (b'event: error\ndata: {"message":"Model overloaded"}\n\n', {"message": "Model overloaded"}, "unavailable"),
        (b'event: error\ndata: "boom"\n\n', "boom", "unavailable"),
        (
            b'data: {"error":{"message":"prompt too long","type":"BadRequestError","code":400}}\n\n',
            {"message": "prompt too long", "type": "BadRequestError", "code": 400},
            "rejected",
        ),
        (
            b'data: {"error":{"message":"try later","code":"503"}}\n\n',
            {"message": "try later", "code": "503"},
            "unavailable",
        ),
        (b'data: {"error":{"message":"nope","code":"422"}}\n\n', {"message": "nope", "code": "422"}, "rejected"),
        (b'data: {"error":"plain words"}\n\n', "plain words", "unavailable"),
    ],
    ids=["event-error", "event-error-string", "error-field-400", "error-field-503", "error-field-422-str", "string"],
)
async def test_an_error_event_raises_with_its_body_after_the_chunks_before_it(
    data: bytes, body: object, kind: str
) -> None:
    got, error = await parsed_until_error(sse(EVENTS[2], done=False) + data + sse(*EVENTS[3:]))
    assert got == [EXPECTED[2]]
    assert isinstance(error, StageErrorEvent)
    assert error.body == body
    words = body.get("message") if isinstance(body, dict) else body
    assert str(error) == f"sent an error event: {words}"
    failure = classify(error)
    assert failure.kind == kind
    assert str(words) in failure.message


@pytest.mark.parametrize(
    ("line", "says"),
    [
        (b"data: {not json}", "malformed stream"),
        (b'data: {"object":"chat.completion.chunk"}', "without choices"),
        (b'data: {"choices":{"0":{}}}', "without choices"),
        (b'data: {"choices":["text"]}', "malformed choice"),
        (b"data: \xff\xfe", "malformed stream"),
    ],
)
async def test_a_chunk_of_the_wrong_shape_is_malformed(line: bytes, says: str) -> None:
    got, error = await parsed_until_error(sse(EVENTS[2], done=False) + line + b"\n\n" + sse(*EVENTS[3:]))
    assert got == [EXPECTED[2]]
    assert isinstance(error, StageMalformed)
    assert says in str(error)


@pytest.mark.parametrize(
    ("delta", "content", "reasoning"),
    [
        ({"reasoning_content": "a"}, "", "a"),
        ({"reasoning": "b"}, "", "b"),
        ({"reasoning_content": "a", "reasoning": "b"}, "", "a"),
        ({"reasoning_content": None, "reasoning": "b", "content": "c"}, "c", "b"),
        ({"content": None, "reasoning_content": 7}, "", ""),
        ({"content": ["not", "text"]}, "", ""),
        ("not an object", "", ""),
    ],
)
async def test_thinking_comes_from_reasoning_content_else_reasoning(
    delta: object, content: str, reasoning: str
) -> None:
    choice = {"index": 0, "delta": delta, "finish_reason": "stop"}
    assert await parsed(sse({"choices": [choice]})) == [Chunk(True, content, reasoning, "stop")]


@pytest.mark.parametrize(
    ("usage", "counts"),
    [
        ({"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}, (12, 5)),
        ({"prompt_tokens": "12", "completion_tokens": 5.0}, (None, None)),
        ({"prompt_tokens": True, "completion_tokens": -1}, (None, None)),
        ({"completion_tokens": 3}, (None, 3)),
        ({}, (None, None)),
        (None, None),
        ("12", None),
    ],
)
async def test_usage_counts_that_are_not_counts_are_none(
    usage: object, counts: tuple[int | None, int | None] | None
) -> None:
    chunks = await parsed(sse(event(finish="stop"), {"choices": [], "usage": usage}))
    assert chunks == [Chunk(True, finish_reason="stop"), Chunk(False, usage=counts)]


async def test_usage_on_a_chunk_with_a_choice_is_kept() -> None:
    data = sse({"choices": [{"delta": {"content": "x"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 1}})
    assert await parsed(data) == [Chunk(True, "x", "", "stop", (1, None))]


@pytest.mark.parametrize(
    ("content_type", "ok"),
    [
        ("text/event-stream; charset=utf-8", True),
        ("Text/Event-Stream", True),
        ("application/json", False),
        ("", False),
    ],
)
async def test_only_an_event_stream_is_read(content_type: str, ok: bool) -> None:
    async with mocked(STREAM, content_type=content_type) as client:
        if ok:
            assert await collect(client) == EXPECTED
        else:
            with pytest.raises(StageMalformed, match=re.escape(repr(content_type or "no content type"))):
                await collect(client)


# --- timeouts ---------------------------------------------------------------------------------------------------------


async def silent(request: Request, conn: Conn) -> None:
    await conn.wait_for_client_to_leave()


async def head_then_silent(request: Request, conn: Conn) -> None:
    await conn.send(head(chunked=True))
    await conn.wait_for_client_to_leave()


async def one_event_then_silent(request: Request, conn: Conn) -> None:
    await conn.send(head(chunked=True) + chunked(sse(EVENTS[0], done=False), end=False))
    await conn.wait_for_client_to_leave()


@pytest.mark.parametrize(
    ("handler", "before"),
    [(silent, []), (head_then_silent, []), (one_event_then_silent, EXPECTED[:1])],
    ids=["no-answer", "head-only", "mid-body"],
)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_silent_server_times_out_within_the_first_byte_timeout(
    transport: str, handler: Handler, before: list[Chunk]
) -> None:
    async with serve(handler) as server, client_for(transport, f"{server.url}/v1", first_byte_timeout_s=0.3) as client:
        started = time.monotonic()
        got, error = await collect_until_error(client)
        elapsed = time.monotonic() - started
        assert isinstance(error, StageTimedOut)
        assert got == before
        assert 0.25 < elapsed < 2
        assert classify(error).kind == "unavailable"
        await eventually(lambda: server.left == 1)  # the client closed the connection it gave up on


@pytest.mark.parametrize("handler", [silent, one_event_then_silent], ids=["before-the-head", "mid-body"])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_callers_own_timeout_stays_a_timeout_error(transport: str, handler: Handler) -> None:
    """The stage backends bound an answer's total time with `asyncio.timeout`: theirs must surface as theirs."""
    async with serve(handler) as server, client_for(transport, f"{server.url}/v1", first_byte_timeout_s=10) as client:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await collect(client)
        assert time.monotonic() - started < 2
        assert len(server.requests) == 1


@pytest.mark.parametrize("handler", [silent, one_event_then_silent], ids=["before-the-head", "mid-body"])
async def test_a_connection_whose_caller_gave_up_is_closed_not_pooled(handler: Handler) -> None:
    async with serve(handler) as server, plain(f"{server.url}/v1", first_byte_timeout_s=10) as client:
        for _ in range(2):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await collect(client)
        await eventually(lambda: server.left == 2)
        assert [(r.connection, r.index) for r in server.requests] == [(1, 0), (2, 0)]


async def test_a_slow_but_steady_stream_is_not_timed_out() -> None:
    """The first-byte timeout bounds each silence, not the whole answer."""

    async def handle(request: Request, conn: Conn) -> None:
        await conn.send(head(chunked=True), *(chunked(sse(e, done=False), end=False) for e in EVENTS), pause_s=0.08)
        await conn.send(chunked(DONE))

    async with serve(handle) as server, plain(f"{server.url}/v1", first_byte_timeout_s=0.3) as client:
        started = time.monotonic()
        assert await collect(client) == EXPECTED
        assert time.monotonic() - started > 0.3


async def test_a_refused_connection_is_unreachable_at_once() -> None:
    async with plain(f"http://127.0.0.1:{unused_port()}/v1") as client:
        with pytest.raises(StageUnreachable, match="ConnectError"):
            await collect(client)


# --- status errors ----------------------------------------------------------------------------------------------------


OPENAI_ERROR = {"error": {"message": "The model `x` does not exist.", "type": "NotFoundError", "code": 404}}


@pytest.mark.parametrize(
    ("status", "content_type", "raw", "body", "words", "kind"),
    [
        (
            404,
            "application/json",
            orjson.dumps(OPENAI_ERROR),
            OPENAI_ERROR["error"],
            "The model `x` does not exist.",
            "rejected",
        ),
        (400, "application/json", b'{"detail":"Bad things"}', {"detail": "Bad things"}, "status 400", "rejected"),
        (422, "application/json", b'["a", "list"]', ["a", "list"], "status 422", "rejected"),
        (502, "text/plain", b"  Bad Gateway\n", "Bad Gateway", "Bad Gateway", "unavailable"),
        (500, "text/html", b"", "", "status 500", "unavailable"),
        (503, None, b"\xff overloaded", "\ufffd overloaded", "\ufffd overloaded", "unavailable"),
    ],
    ids=["openai-404", "json-not-openai", "json-list", "text-502", "empty-500", "not-utf8-503"],
)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_error_status_raises_with_the_servers_words(
    transport: str, status: int, content_type: str | None, raw: bytes, body: object, words: str, kind: str
) -> None:
    async with (
        serve(always(response(raw, status, content_type=content_type, headers={"X-Trace": "t1"}))) as server,
        client_for(transport, f"{server.url}/v1") as client,
    ):
        with pytest.raises(StageStatus) as caught:
            await collect(client)
    error = caught.value
    assert (error.status, error.body) == (status, body)
    assert error.headers.get("x-trace") == "t1"
    assert str(error) == f"answered HTTP {status}: {words}"
    failure = classify(error)
    assert (failure.kind, failure.detail) == (kind, words)
    assert failure.message.endswith(f"HTTP {status}: {words}")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_retry_after_is_read_from_the_response_headers(transport: str) -> None:
    answer = response(b'{"error":{"message":"slow down","code":"rate_limited"}}', 429, headers={"Retry-After": "7"})
    async with serve(always(answer)) as server, client_for(transport, f"{server.url}/v1") as client:
        with pytest.raises(StageStatus) as caught:
            await collect(client)
    assert retry_after_s(caught.value.headers) == 7.0
    assert classify(caught.value) == Failure(
        "unavailable", "answered HTTP 429: slow down", 7.0, "rate_limited", "slow down"
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_huge_error_body_is_read_only_as_far_as_the_message_needs(transport: str) -> None:
    """10 MB announced, 1 MB sent, then silence: reading it all would hang until the first-byte timeout."""
    size, sent = 10 * 1024 * 1024, 1024 * 1024
    text = b"Internal error: " + b"x" * (sent - 16)

    async def handle(request: Request, conn: Conn) -> None:
        await conn.send(head(500, content_type="text/plain", length=size), text)
        await conn.wait_for_client_to_leave()

    async with serve(handle) as server, client_for(transport, f"{server.url}/v1", first_byte_timeout_s=5) as client:
        started = time.monotonic()
        with pytest.raises(StageStatus) as caught:
            await collect(client)
        assert time.monotonic() - started < 1
        await eventually(lambda: server.left == 1)
    error = caught.value
    assert error.status == 500
    assert isinstance(error.body, str)
    assert len(error.body) == MAX_ERROR_BODY_BYTES
    assert str(error).startswith("answered HTTP 500: Internal error: xxx")
    assert str(error).endswith("…")
    assert len(str(error)) < 400


# --- classify ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "rejected"),
        (401, "rejected"),
        (403, "rejected"),
        (404, "rejected"),
        (408, "unavailable"),
        (413, "rejected"),
        (422, "rejected"),
        (429, "unavailable"),
        (499, "rejected"),
        (500, "unavailable"),
        (502, "unavailable"),
        (503, "unavailable"),
        (504, "unavailable"),
        (302, "unavailable"),
    ],
)
def test_classify_maps_statuses_and_passes_retry_after_only_when_asking_again_may_help(status: int, kind: str) -> None:
    failure = classify(StageStatus(status, {"message": "m", "code": "c"}, {"retry-after": "3"}))
    assert failure.kind == kind
    assert failure.retry_after_s == (3.0 if kind == "unavailable" else None)
    assert (failure.code, failure.detail) == ("c", "m")
    assert failure.message == (
        f"refused the request with HTTP {status}: m" if kind == "rejected" else f"answered HTTP {status}: m"
    )


@pytest.mark.parametrize(
    ("body", "kind", "says"),
    [
        ({"message": "bad", "code": 400}, "rejected", "refused the request with an error event (code 400): bad"),
        ({"message": "bad", "code": "400"}, "rejected", "refused the request with an error event (code 400): bad"),
        ({"message": "slow", "code": 429}, "unavailable", "answered an error event (code 429): slow"),
        ({"message": "down", "code": 500}, "unavailable", "answered an error event (code 500): down"),
        ({"message": "hm"}, "unavailable", "answered an error event (code None): hm"),
        (
            {"message": "hm", "code": "invalid_request"},
            "unavailable",
            "answered an error event (code invalid_request): hm",
        ),
        ({"message": "hm", "code": -400}, "unavailable", "answered an error event (code -400): hm"),
        # the GLM open platform's business codes are never read as HTTP statuses
        ({"message": "hm", "code": "1234"}, "unavailable", "answered an error event (code 1234): hm"),
        (
            {"message": "敏感", "code": "1301"},
            "rejected",
            "refused the request with an error event (code 1301): 敏感 (the vendor's safety check refused the content)",
        ),
        ("words", "unavailable", "answered an error event (code None): words"),
    ],
)
def test_classify_maps_error_events_by_their_code(body: object, kind: str, says: str) -> None:
    failure = classify(StageErrorEvent(body))
    assert (failure.kind, failure.message, failure.retry_after_s) == (kind, says, None)


def test_classify_maps_connection_failures_timeouts_and_malformed_answers() -> None:
    assert classify(StageUnreachable("could not be reached (x)")) == Failure("unavailable", "could not be reached (x)")
    assert classify(StageTimedOut("did not answer in time")) == Failure("unavailable", "did not answer in time")
    assert classify(StageMalformed("sent junk")) == Failure("invalid", "sent junk")


def subclasses(cls: type[StageHttpError]) -> set[type[StageHttpError]]:
    found = set(cls.__subclasses__())
    return found.union(*(subclasses(sub) for sub in found))


EXAMPLES: dict[type[StageHttpError], StageHttpError] = {
    StageUnreachable: StageUnreachable("could not be reached (x)"),
    StageTimedOut: StageTimedOut("did not answer in time"),
    StageStatus: StageStatus(418, "teapot", {}),
    StageErrorEvent: StageErrorEvent({"message": "x"}),
    StageMalformed: StageMalformed("sent junk"),
}


def test_every_error_of_the_tree_has_a_meaning() -> None:
    defined = {cls for cls in subclasses(StageHttpError) if cls.__module__ == errors_module.__name__}
    assert defined == set(EXAMPLES), "a new StageHttpError needs an example here and a case in classify"
    for error in EXAMPLES.values():
        failure = classify(error)
        assert failure.kind in ("unavailable", "rejected", "invalid")
        assert failure.message


# --- the request ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "path"),
    [
        ("", "/chat/completions"),
        ("/", "/chat/completions"),
        ("/v1", "/v1/chat/completions"),
        ("/v1/", "/v1/chat/completions"),
        ("/a/b/v1", "/a/b/v1/chat/completions"),
    ],
)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_request_goes_to_the_base_urls_path_as_json_with_its_headers(
    transport: str, suffix: str, path: str
) -> None:
    async with serve(always(response())) as server, client_for(transport, server.url + suffix) as client:
        assert await collect(client, {"x-request-id": "r-1"}) == EXPECTED
        async with aclosing(ChatClient(server.url + suffix, api_key="sk-test")) as keyed:
            assert await collect(keyed) == EXPECTED
    plain, keyed_request = server.requests
    assert (plain.method, plain.target) == ("POST", path)
    assert plain.body == orjson.dumps(BODY)
    assert orjson.loads(plain.body) == BODY
    assert plain.headers["host"] == f"127.0.0.1:{server.port}"
    assert plain.headers["content-length"] == str(len(plain.body))
    assert plain.headers["content-type"] == "application/json"
    assert plain.headers["authorization"] == "Bearer EMPTY"
    assert plain.headers["x-request-id"] == "r-1"
    assert "x-request-id" not in keyed_request.headers
    assert keyed_request.headers["authorization"] == "Bearer sk-test"


@pytest.mark.parametrize("key", ["sk\r\nx-injected: 1", "sk\n", "sk\0"])
def test_an_api_key_with_a_line_break_is_refused_at_construction(key: str) -> None:
    with pytest.raises(ValueError, match="line break"):
        ChatClient("http://stage.test/v1", api_key=key)


async def test_credentials_in_the_base_url_never_reach_the_server() -> None:
    async with serve(always(response())) as server, plain(f"http://user:secret@127.0.0.1:{server.port}/v1") as client:
        assert await collect(client) == EXPECTED
    [request] = server.requests
    assert request.headers["host"] == f"127.0.0.1:{server.port}"
    assert "secret" not in repr(request)


async def test_the_client_asks_for_an_unencoded_body() -> None:
    async with serve(always(response())) as server, plain(server.url) as client:
        await collect(client)
    assert server.requests[0].headers["accept-encoding"] == "identity"


@pytest.mark.parametrize(
    "headers",
    [{"x-a": "v\r\nx-injected: 1"}, {"x-a": "v\nw"}, {"x-a": "v\rw"}, {"x-a": "v\0w"}, {"x-a\r\nx-b": "v"}],
    ids=["crlf", "lf", "cr", "nul", "in-name"],
)
async def test_a_header_with_a_line_break_is_refused_and_nothing_is_sent(headers: dict[str, str]) -> None:
    async with serve(always(response())) as server, plain(f"{server.url}/v1") as client:
        with pytest.raises(StageUnreachable, match="nothing was sent"):
            await collect(client, headers)
        assert server.accepted == 0
        assert await collect(client) == EXPECTED  # with a pooled connection too: it stays usable
        with pytest.raises(StageUnreachable, match="nothing was sent"):
            await collect(client, headers)
        assert await collect(client) == EXPECTED
    assert len(server.requests) == 2
    assert server.accepted == 1


# --- model_ids --------------------------------------------------------------------------------------------------------


def models(raw: bytes, status: int = 200, content_type: str = "application/json") -> Handler:
    return always(response(raw, status, content_type=content_type))


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_model_ids_lists_the_ids(transport: str) -> None:
    page = {"object": "list", "data": [{"id": "a", "object": "model"}, {"id": "b/c"}, "junk", {"object": "model"}]}
    async with serve(models(orjson.dumps(page))) as server, client_for(transport, f"{server.url}/v1/") as client:
        assert await client.model_ids(2.0) == ["a", "b/c", ""]
        assert await client.model_ids(2.0) == ["a", "b/c", ""]
    assert [(r.method, r.target, r.body) for r in server.requests] == [("GET", "/v1/models", b"")] * 2
    assert server.requests[0].headers["authorization"] == "Bearer EMPTY"
    if transport == "aiohttp":
        assert server.accepted == 1


@pytest.mark.parametrize(
    ("handler", "error", "says"),
    [
        (models(b"<html>Not here</html>", content_type="text/html"), StageMalformed, "not JSON"),
        (models(b'{"models": []}'), StageMalformed, "without `data`"),
        (models(b'{"detail":"Not Found"}', 404), StageStatus, "HTTP 404"),
        (models(b'{"error":{"message":"down"}}', 503), StageStatus, "HTTP 503: down"),
        (silent, StageTimedOut, "did not answer in time"),
        (head_then_silent, StageTimedOut, "did not answer in time"),
    ],
    ids=["not-json", "no-data", "404", "503", "silent", "head-only"],
)
async def test_model_ids_raises_stage_errors_only(handler: Handler, error: type[StageHttpError], says: str) -> None:
    async with serve(handler) as server, plain(f"{server.url}/v1") as client:
        started = time.monotonic()
        with pytest.raises(error, match=says):
            await client.model_ids(0.3)
        assert time.monotonic() - started < 2


async def test_model_ids_bounds_a_trickle_by_its_whole_timeout() -> None:
    """`model_ids`' timeout bounds the whole call, unlike the chat stream's first-byte timeout."""

    async def trickle(request: Request, conn: Conn) -> None:
        page = orjson.dumps({"data": [{"id": "a"}]})
        await conn.send(head(length=len(page), content_type="application/json"), *one_by_one(page), pause_s=0.1)

    async with serve(trickle) as server, plain(f"{server.url}/v1") as client:
        started = time.monotonic()
        with pytest.raises(StageTimedOut):
            await client.model_ids(0.3)
        assert time.monotonic() - started < 1
