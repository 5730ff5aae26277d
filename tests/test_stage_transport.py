"""The stage-protocol client's transports against raw-byte servers on loopback (`tests/raw_http.py`): aiohttp,
httpx, uvloop, keep-alive and the pool (HTTP framing: `test_stage_framing.py`)."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from contextlib import aclosing

import httpx
import orjson
import pytest
import uvloop

from stage_protocol import client as protocol
from stage_protocol.client import transport as transport_module
from stage_protocol.client.transport import AiohttpTransport, HttpxTransport
from tests.raw_http import (
    BODY,
    EVENTS,
    EXPECTED,
    STREAM,
    TRANSPORTS,
    Conn,
    Framing,
    Handler,
    Request,
    always,
    chunked,
    client_for,
    collect,
    event,
    eventually,
    head,
    plain,
    response,
    serve,
    sse,
)

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
            with pytest.raises(protocol.StageTimedOut):  # connection 3 again
                await anext(aiter(client.chunks({"hang": True})))
            assert time.monotonic() - started < 2
            await eventually(lambda: server.left == 2)
        assert [(r.connection, r.index) for r in server.requests] == [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]

    uvloop.run(scenario())


def test_plain_http_goes_through_aiohttp_and_https_through_httpx_unless_named() -> None:
    assert isinstance(protocol.ChatClient("https://stage.example/v1")._transport, HttpxTransport)
    assert isinstance(protocol.ChatClient("http://stage.example/v1")._transport, AiohttpTransport)
    assert isinstance(protocol.ChatClient("http://stage.example/v1", transport="httpx")._transport, HttpxTransport)
    assert isinstance(protocol.ChatClient("https://stage.example/v1", transport="aiohttp")._transport, AiohttpTransport)
    injected = protocol.ChatClient("http://stage.example/v1", http_client=httpx.AsyncClient())
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
        with pytest.raises(protocol.StageUnreachable, match="could not be reached"):
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
            with pytest.raises(protocol.StageStatus, match="busy"):
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


def answered_once_then(partial: bytes, *, reset: bool = False) -> Handler:
    """The first request on a connection is answered; a later one gets `partial`, then the connection closes (with a
    reset: RST instead of FIN)."""

    async def handle(request: Request, conn: Conn) -> None:
        if request.index == 0:
            await conn.send(response())
            return
        await conn.send(partial)
        if reset:
            conn.writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            conn.writer.transport.abort()
        else:
            await conn.close()

    return handle


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
async def test_a_pooled_connection_closed_as_the_request_arrives_is_retried_once_on_a_new_one(reset: bool) -> None:
    """The race the pool cannot see coming: the server closes the idle connection just as the next request goes
    out on it. No byte of a response came, so the request is sent again, on a new connection."""

    async with serve(answered_once_then(b"", reset=reset)) as server, plain(f"{server.url}/v1") as client:
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
        with pytest.raises(protocol.StageUnreachable, match="could not be reached"):
            await collect(client)
        assert server.accepted == 2
        # no pooled connection: the new one fails, no retry
        with pytest.raises(protocol.StageUnreachable, match="could not be reached"):
            await collect(client)
        assert server.accepted == 3
        assert len(server.requests) == 4


@pytest.mark.parametrize(
    "partial",
    [b"HTTP/1.1 200 OK\r\nContent-Ty", head(length=len(STREAM)) + STREAM[:40]],
    ids=["mid-head", "mid-body"],
)
async def test_a_reused_connection_that_breaks_after_part_of_an_answer_is_not_retried(partial: bytes) -> None:
    """Part of the answer came: the server did take the request, so sending it again could do the work twice."""
    async with serve(answered_once_then(partial)) as server, plain(f"{server.url}/v1") as client:
        assert await collect(client) == EXPECTED
        with pytest.raises(protocol.StageUnreachable, match="before the response was complete"):
            await collect(client)
        assert server.accepted == 1
        assert len(server.requests) == 2


async def test_a_model_list_is_sent_at_most_twice_when_connections_keep_closing() -> None:
    """aiohttp retries a GET once by itself; the transport adds no retry of its own on top."""
    page = orjson.dumps({"data": [{"id": "m"}]})

    async def handle(request: Request, conn: Conn) -> None:
        if (request.connection, request.index) == (1, 0):
            await conn.send(response(page, content_type="application/json"))
        else:
            await conn.close()

    async with serve(handle) as server, plain(f"{server.url}/v1") as client:
        assert await client.model_ids(2.0) == ["m"]
        with pytest.raises(protocol.StageUnreachable):
            await client.model_ids(2.0)
        assert len(server.requests) == 3


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_closed_client_is_unreachable_not_a_runtime_error(transport: str) -> None:
    async with serve(always(response())) as server, client_for(transport, f"{server.url}/v1") as client:
        assert await collect(client) == EXPECTED
        await client._transport.aclose()
        if isinstance(client._transport, HttpxTransport):
            await client._transport._client.aclose()  # an injected client: its owner closes it
        with pytest.raises(protocol.StageUnreachable, match="closed"):
            await collect(client)
        with pytest.raises(protocol.StageUnreachable, match="closed"):
            await client.model_ids(1.0)


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
