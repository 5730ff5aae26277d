"""The stage-protocol client's transports against raw-byte servers on loopback (`tests/raw_http.py`): every HTTP
framing of a streamed answer, however its bytes are split, and bodies cut short or not HTTP at all."""

from __future__ import annotations

import time

import pytest

from stage_protocol import client as protocol
from tests.raw_http import (
    EVENTS,
    EXPECTED,
    STREAM,
    Conn,
    Framing,
    Request,
    chunked,
    collect,
    collect_until_error,
    cut,
    head,
    plain,
    serve,
    sse,
)


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
        assert isinstance(error, protocol.StageUnreachable)
        assert "before the response was complete" in str(error)
        assert protocol.classify(error).kind == "unavailable"


async def test_an_answer_that_is_not_http_is_malformed() -> None:
    async def handle(request: Request, conn: Conn) -> None:
        await conn.send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")

    async with serve(handle) as server, plain(f"{server.url}/v1") as client:
        with pytest.raises(protocol.StageMalformed, match=r"not HTTP/1\.1"):
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

    async with serve(handle) as server, plain(f"{server.url}/v1", first_byte_timeout_s=5) as client:
        started = time.monotonic()
        got, error = await collect_until_error(client)
    # aiohttp drops what it had buffered when the framing breaks in the same read; nothing after the break arrives
    assert got == (EXPECTED[:1] if pause_s else [])
    assert isinstance(error, protocol.StageMalformed)
    assert "not HTTP/1.1" in str(error)
    assert time.monotonic() - started < 1  # aiohttp leaves the reader waiting: the transport looks, well before 5 s
