"""How `ChatClient` exchanges bytes with a server: the `Transport` seam and its implementations.

- `AiohttpTransport` (`aiohttp`, the client LiteLLM itself uses): plain `http://` servers, a stage server on the same
  host or network, the usual case. No proxy and no `.netrc` is ever used. Idle connections are kept `KEEPALIVE_S`,
  less than the 5 s after which uvicorn (vLLM's, SGLang's and our stage servers') closes them; a pooled connection
  that the server closed (or reset) anyway as a POST went out is replaced once, transparently, when it fails before
  any byte of the response (aiohttp itself retries a GET once); every other failure is the caller's.
- `HttpxTransport` (`httpx`): `https://` servers (TLS, and the proxy settings of the environment), and a client
  injected by tests or by a deployment's own code.

Both raise `StageUnreachable`, `StageTimedOut` and `StageMalformed` only (`chat.py` draws the tree), a closed client
included. Timeouts: `connect_s` to connect; `read_s` for the longest silence, before the response's head and between
pieces of its body.

`bench/overhead_vs_litellm.py --transport` measured both, and an own HTTP/1.1 client that aiohttp replaced, side by
side (docs/benchmarks.md, "HTTP transport").
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiohttp
import aiohttp.connector
import aiohttp.http
import aiohttp.http_exceptions
import aiohttp.tracing
import httpx

from stage_protocol.client.errors import StageMalformed, StageTimedOut, StageUnreachable

TransportName = Literal["auto", "aiohttp", "httpx"]
"""`auto`: `aiohttp` for `http://`, `httpx` for `https://`."""
MAX_CONNECTIONS = 1000
"""Connections open to one server at once; a request beyond them waits for one (within `connect_s`)."""
BROKEN_BODY_POLL_S = 0.25
"""How often a silent body read looks for a framing error aiohttp has recorded but not raised."""
KEEPALIVE_S = 4.0
"""How long an idle connection is kept: less than uvicorn's 5 s, so the server rarely closes one as it is reused."""


@dataclass
class Response:
    """A response whose head has arrived: `status`, `headers` (names in lower case) and the body, read by
    iterating `body` once."""

    status: int
    headers: Mapping[str, str]
    body: AsyncIterator[bytes]


class Transport(Protocol):
    def exchange(
        self, method: str, url: str, content: bytes | None, headers: Mapping[str, str], timeouts: Timeouts
    ) -> AbstractAsyncContextManager[Response]: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class Timeouts:
    connect_s: float
    read_s: float


# Over aiohttp


class AiohttpTransport:
    """Plain-HTTP exchanges over one `aiohttp.ClientSession`, opened on first use (in the loop that uses it)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _opened(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=_NotingConnector(limit=MAX_CONNECTIONS, keepalive_timeout=KEEPALIVE_S),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,  # identity is asked for; anything else is the server's mistake, passed on
                trust_env=False,
            )
        return self._session

    @asynccontextmanager
    async def exchange(
        self, method: str, url: str, content: bytes | None, headers: Mapping[str, str], timeouts: Timeouts
    ) -> AsyncIterator[Response]:
        if self._session is not None and self._session.closed:
            raise StageUnreachable("could not be reached (the client is closed)")
        session = self._opened()
        timeout = aiohttp.ClientTimeout(
            total=None, connect=timeouts.connect_s, sock_connect=timeouts.connect_s, sock_read=timeouts.read_s
        )
        for attempt in (1, 2):
            _REUSED.set(False)
            try:
                with _aiohttp_translated():
                    response = await session.request(
                        method,
                        url,
                        data=content,
                        headers=headers,
                        timeout=timeout,
                        allow_redirects=False,
                    )
                break
            except StageUnreachable as exc:  # a pooled connection the server closed: once more, on a new one
                if attempt == 2 or method in _IDEMPOTENT or not _REUSED.get() or not _closed_unanswered(exc.__cause__):
                    raise
        finished = False
        try:
            yield Response(response.status, response.headers, _aiohttp_body(response, timeouts.read_s))
            finished = True
        finally:
            if finished:
                response.release()  # back to the pool when the body was read to its end, else closed
            else:
                response.close()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


_IDEMPOTENT = frozenset({"GET", "HEAD"})
"""aiohttp retries these once itself, on any connection."""
_CLOSED = frozenset({errno.ECONNRESET, errno.EPIPE})


def _closed_unanswered(exc: BaseException | None) -> bool:
    """Whether `exc` is a connection the server closed (or reset) before any byte of the response's head: the server
    cannot have taken the request, so it may go again."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return not isinstance(exc.message, aiohttp.http.RawResponseMessage)  # else part of a head had arrived
    return isinstance(exc, aiohttp.ClientOSError) and exc.errno in _CLOSED


_REUSED: contextvars.ContextVar[bool] = contextvars.ContextVar("stage_connection_reused", default=False)
"""Whether the connection of the request under way in this task was one from the pool (`_NotingConnector`)."""


class _NotingConnector(aiohttp.TCPConnector):
    """A `TCPConnector` that notes in `_REUSED` whether the connection it hands out served a request before.

    aiohttp's `on_connection_reuseconn` trace would say the same, but any trace config makes aiohttp build and
    await its trace events for every request and every chunk of every body, a few percent of a short request."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._served: weakref.WeakSet[object] = weakref.WeakSet()

    async def connect(
        self,
        req: aiohttp.ClientRequest,
        traces: list[aiohttp.tracing.Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (aiohttp's signature)
    ) -> aiohttp.connector.Connection:
        connection = await super().connect(req, traces, timeout)
        protocol = connection.protocol
        _REUSED.set(protocol in self._served)
        if protocol is not None:
            self._served.add(protocol)
        return connection


async def _aiohttp_body(response: aiohttp.ClientResponse, read_s: float) -> AsyncIterator[bytes]:
    """The body's pieces as they arrive, within `read_s` of silence. aiohttp 3.14 leaves a reader waiting, its own
    `sock_read` timer stopped, when the body's framing breaks after the head (the error stays on the connection's
    protocol), so the wait goes in slices of `BROKEN_BODY_POLL_S`, each followed by a look there. What has arrived
    already is taken without a timer (a short answer is whole by the time its head is read)."""
    loop = asyncio.get_running_loop()
    with _aiohttp_translated():
        while True:
            piece = response.content.read_nowait()
            if piece:
                yield piece
                continue
            if response.content.at_eof():
                return
            silent_until = loop.time() + read_s
            while True:
                try:
                    async with asyncio.timeout(min(BROKEN_BODY_POLL_S, max(0.0, silent_until - loop.time()))):
                        piece = await response.content.readany()
                    break
                except TimeoutError:
                    protocol = response.connection.protocol if response.connection else None
                    broken = protocol.exception() if protocol is not None else None
                    if isinstance(broken, aiohttp.http_exceptions.HttpProcessingError):
                        raise aiohttp.ClientResponseError(response.request_info, (), message=str(broken)) from broken
                    if loop.time() >= silent_until:
                        raise
            if not piece:
                return
            yield piece


@contextmanager
def _aiohttp_translated() -> Iterator[None]:
    """aiohttp's exceptions as the `StageHttpError` tree."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise StageTimedOut("did not answer in time (connecting)") from exc
    except TimeoutError as exc:  # aiohttp's own (a silence longer than `read_s`); the caller's arrive as cancellation
        raise StageTimedOut("did not answer in time") from exc
    except aiohttp.ClientConnectorError as exc:
        raise StageUnreachable(f"could not be reached (ConnectError: {exc})") from exc
    except aiohttp.ServerDisconnectedError as exc:
        raise StageUnreachable(
            "could not be reached (the server closed the connection, before the response was complete)"
        ) from exc
    except aiohttp.ClientPayloadError as exc:
        raise StageUnreachable(f"could not be reached ({exc}, before the response was complete)") from exc
    except aiohttp.ClientResponseError as exc:
        raise StageMalformed(f"sent a response that is not HTTP/1.1 ({exc.message})") from exc
    except aiohttp.ClientError as exc:
        raise StageUnreachable(f"could not be reached ({type(exc).__name__}: {exc})") from exc


# Over httpx


class HttpxTransport:
    def __init__(self, client: httpx.AsyncClient, *, owned: bool) -> None:
        self._client = client
        self._owned = owned

    @asynccontextmanager
    async def exchange(
        self, method: str, url: str, content: bytes | None, headers: Mapping[str, str], timeouts: Timeouts
    ) -> AsyncIterator[Response]:
        if self._client.is_closed:
            raise StageUnreachable("could not be reached (the client is closed)")
        timeout = httpx.Timeout(timeouts.read_s, connect=timeouts.connect_s)
        with _httpx_translated():
            request = self._client.build_request(method, url, content=content, headers=headers, timeout=timeout)
            response = await self._client.send(request, stream=True)
        try:
            yield Response(response.status_code, response.headers, _httpx_body(response))
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        if self._owned:
            await self._client.aclose()


async def _httpx_body(response: httpx.Response) -> AsyncIterator[bytes]:
    with _httpx_translated():
        async for piece in response.aiter_bytes():
            yield piece


@contextmanager
def _httpx_translated() -> Iterator[None]:
    """httpx's exceptions as the `StageHttpError` tree."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise StageTimedOut("did not answer in time") from exc
    except httpx.DecodingError as exc:
        raise StageMalformed(f"sent a body that does not decode ({exc})") from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise StageUnreachable(f"could not be reached ({type(exc).__name__}: {exc})") from exc


def httpx_transport() -> HttpxTransport:
    limits = httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=100, keepalive_expiry=KEEPALIVE_S)
    return HttpxTransport(httpx.AsyncClient(limits=limits), owned=True)
