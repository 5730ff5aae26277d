"""Our own HTTP/1.1 client, `WireTransport`, kept for the side-by-side measurement of `bench/overhead_vs_litellm.py
--transport` (docs/benchmarks.md): HTTP/1.1 on asyncio's own protocol API with `httptools`' response parser,
keep-alive connections pooled per host. Interim responses (1xx) are skipped; a connection that sends more than the
response to its request is closed, never reused. A pooled connection that the server had closed while idle is
replaced once, transparently, when it fails before any byte of the response; every other failure is the caller's.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import cast
from urllib.parse import urlsplit

import httptools

from stage_protocol.client.errors import StageMalformed, StageTimedOut, StageUnreachable
from stage_protocol.client.transport import Response, Timeouts

MAX_IDLE_PER_HOST = 100
PAUSE_READING_AT = 1024 * 1024
"""Body bytes received but not yet read by the caller beyond which the socket is not read (flow control)."""
_NO_BODY_STATUSES = frozenset({204, 304})
_BREAKS = re.compile("[\r\n\0]")


class WireTransport:
    """Plain-HTTP/1.1 exchanges over pooled keep-alive connections."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._closed = False

    @asynccontextmanager
    async def exchange(
        self, method: str, url: str, content: bytes | None, headers: Mapping[str, str], timeouts: Timeouts
    ) -> AsyncIterator[Response]:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or 80
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        authority = parts.netloc.rpartition("@")[2]  # never a URL's user:password
        data = (_request_head(method, target, authority, headers, len(content or b"")), content or b"")
        connection = await self._exchanged(host, port, data, timeouts)
        try:
            status, response_headers = connection.response_head()
            yield Response(status, response_headers, connection.body(timeouts.read_s))
        finally:
            if connection.reusable and not self._closed:
                idle = self._idle.setdefault((host, port), [])
                idle.append(connection)
                for surplus in idle[:-MAX_IDLE_PER_HOST]:
                    surplus.close()
                del idle[:-MAX_IDLE_PER_HOST]
            else:
                connection.close()

    async def _exchanged(self, host: str, port: int, data: tuple[bytes, bytes], timeouts: Timeouts) -> _Connection:
        """A connection that has sent `data` and received the response's head: a pooled one, else a new one. A
        pooled connection that the server closes before answering anything (it had timed out the idle connection)
        is replaced by a new one, once."""
        pooled = self._pooled(host, port)
        if pooled is not None:
            try:
                return await _requested(pooled, data, timeouts.read_s)
            except StageUnreachable:
                if pooled.received:
                    raise
        return await _requested(await _connect(host, port, timeouts.connect_s), data, timeouts.read_s)

    def _pooled(self, host: str, port: int) -> _Connection | None:
        idle = self._idle.get((host, port))
        while idle:
            connection = idle.pop()
            if connection.open:
                return connection
        return None

    async def aclose(self) -> None:
        self._closed = True
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()


def _request_head(method: str, target: str, host: str, headers: Mapping[str, str], length: int) -> bytes:
    fields = {"host": host, "content-length": str(length), "accept-encoding": "identity", **headers}
    if _BREAKS.search("".join(f"{name}{value}" for name, value in fields.items())):
        raise StageUnreachable("could not be reached (a request header holds a line break or NUL; nothing was sent)")
    lines = [f"{method} {target} HTTP/1.1", *(f"{name}: {value}" for name, value in fields.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _requested(connection: _Connection, data: tuple[bytes, bytes], read_s: float) -> _Connection:
    """`connection`, once it has sent `data` (the request's head and body) and received the response's head; closed on
    failure."""
    connection.send(data)
    try:
        async with asyncio.timeout(read_s):
            await connection.head()
    except TimeoutError as exc:
        connection.close()
        raise StageTimedOut("did not answer in time") from exc
    except BaseException:  # our errors, and a cancellation (the caller's deadline, a client gone): never pooled
        connection.close()
        raise
    return connection


async def _connect(host: str, port: int, timeout_s: float) -> _Connection:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            _, connection = await loop.create_connection(_Connection, host, port)
    except TimeoutError as exc:
        raise StageTimedOut("did not answer in time (connecting)") from exc
    except OSError as exc:
        raise StageUnreachable(f"could not be reached (ConnectError: {exc})") from exc
    return connection


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection, one exchange at a time: `send` the request, await `head`, iterate `body`."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._lost: Exception | None = None
        self._reset()

    def _reset(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._headers: dict[str, str] = {}
        self._head: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pieces: list[bytes] = []
        self._buffered = 0
        self._wakeup: asyncio.Future[None] | None = None
        self._complete = False
        self._interim = False
        self._keep_alive = False
        self._received = False
        self._drained = False

    # asyncio's side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not derive from asyncio's

    def data_received(self, data: bytes) -> None:
        self._received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._lost = StageMalformed("switched protocols (101): not a chat completion")
            self._fail(self._lost)
            self.close()
        except httptools.HttpParserError as exc:
            self._lost = StageMalformed(f"sent a response that is not HTTP/1.1 ({exc})")
            self._fail(self._lost)
            self.close()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._complete and self._head.done() and self._close_delimited():
            self.on_message_complete()
        if self._lost is None:  # else it is our own verdict, and we closed the connection
            reason = f"{type(exc).__name__}: {exc}" if exc else "the server closed the connection"
            self._lost = StageUnreachable(f"could not be reached ({reason}, before the response was complete)")
        self._fail(self._lost)

    # httptools' callbacks

    def on_message_begin(self) -> None:
        if self._complete:  # a second response to one request: nothing on this connection can be trusted now
            self._lost = StageMalformed("sent more than one response to one request")
            self._fail(self._lost)
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if 100 <= self._parser.get_status_code() < 200:  # an interim response (100 Continue, 103): the real one follows
            self._interim = True
            self._headers = {}
            return
        if not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._complete or self._lost is not None:
            return
        self._pieces.append(body)
        self._buffered += len(body)
        if self._buffered > PAUSE_READING_AT and self._transport is not None:
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._keep_alive = self._parser.should_keep_alive()  # the parser knows only until it resets for the next
        self._complete = True
        self._wake()

    # the caller's side

    @property
    def open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing() and self._lost is None

    @property
    def reusable(self) -> bool:
        return self.open and self._complete and self._drained and self._keep_alive

    def send(self, data: tuple[bytes, bytes]) -> None:
        """Write the request's head and body (uvloop writes both without joining them: the body can be megabytes)."""
        assert self._transport is not None
        self._reset()
        self._transport.resume_reading()  # never paused between exchanges, but a paused one would wait out `read_s`
        self._transport.writelines(data)

    @property
    def received(self) -> bool:
        """Whether any byte of the current response has arrived."""
        return self._received

    async def head(self) -> None:
        await self._head

    def response_head(self) -> tuple[int, dict[str, str]]:
        return self._parser.get_status_code(), self._headers

    async def body(self, read_s: float) -> AsyncIterator[bytes]:
        status = self._parser.get_status_code()
        while not (self._complete or status in _NO_BODY_STATUSES) or self._pieces:
            if not self._pieces:
                if self._lost is not None:
                    raise self._lost
                self._wakeup = asyncio.get_running_loop().create_future()
                try:
                    async with asyncio.timeout(read_s):
                        await self._wakeup
                except TimeoutError as exc:
                    raise StageTimedOut("did not answer in time") from exc
                continue
            pieces, self._pieces, self._buffered = self._pieces, [], 0
            if self._transport is not None and not self._transport.is_closing():
                self._transport.resume_reading()
            for piece in pieces:
                yield piece
        self._drained = True

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _close_delimited(self) -> bool:
        return "content-length" not in self._headers and "transfer-encoding" not in self._headers

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _fail(self, error: Exception) -> None:
        if not self._head.done():
            self._head.set_exception(error)
            self._head.exception()  # retrieved here: nobody may be waiting yet
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_exception(error)
