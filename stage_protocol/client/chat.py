"""Streaming chat completions from an OpenAI-compatible server (`transport.py` carries the bytes), and the one
translation of their failures.

A request body goes out as JSON, as given (`orjson`); the answer must be a `text/event-stream` of chat completion
chunks, read as they arrive, up to `data: [DONE]` or the end of the body (what follows `[DONE]` is read and dropped:
a connection whose response was left unread cannot serve another request). Each chunk is checked for the shape every
OpenAI-compatible server shares and reduced to a `Chunk`; servers differ in everything else, which is ignored.

The errors, drawn once::

    StageHttpError
    ├── StageUnreachable     no connection, or it broke (refused, reset, DNS, closed mid-body)
    ├── StageTimedOut        connecting took longer than `connect_timeout_s`, or the server was silent for
    │                        longer than `first_byte_timeout_s` (before the answer began or between its parts)
    ├── StageStatus          an HTTP status other than 2xx; `status`, `body` (the `error` object of an OpenAI-style
    │                        error body, else the body's text), `headers`
    ├── StageErrorEvent      an error event inside a 200 stream (`event: error`, or a chunk with an `error` field);
    │                        `body` is its error object
    └── StageMalformed       a 200 that is not an event stream, an event that is not JSON (or not UTF-8), a chunk
                             without `choices`, an event larger than `MAX_EVENT_BYTES`, no chunk at all, or a
                             stream ending before any `finish_reason` (cut mid-answer)

`stage_protocol.client.failures.classify` says what each means for the stage.

This client neither retries nor bounds an answer's total time: the stage backends and the orchestrator's resilience
layer do.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson

from stage_protocol.client.errors import (
    StageErrorEvent,
    StageMalformed,
    StageStatus,
    StageTimedOut,
    StageUnreachable,
    clip,
)
from stage_protocol.client.transport import (
    AiohttpTransport,
    HttpxTransport,
    Response,
    Timeouts,
    Transport,
    TransportName,
    httpx_transport,
)

NO_API_KEY = "EMPTY"
"""Sent when no key is configured: vLLM and SGLang accept any key unless started with one."""
MAX_EVENT_BYTES = 4 * 1024 * 1024
"""No chunk of an answer is this large; a line that grows past it is a server sending garbage."""
MAX_ERROR_BODY_BYTES = 64 * 1024
"""How much of an error response is read for its message."""
DONE = b"[DONE]"
BOM = b"\xef\xbb\xbf"
FINISH_ALIASES = {"model_context_window_exceeded": "length"}
"""Finish reasons some servers name their own way (the GLM open platform's end of the context window)."""
_BREAKS = re.compile("[\r\n\0]")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
"""An HTTP header name (RFC 9110's token)."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk of the answer: its first choice's text, thinking (`reasoning_content`, vLLM up to 0.11 and SGLang,
    else `reasoning`, newer vLLM) and finish reason; `choice` False for a chunk with no choice (the usage chunk);
    `usage` (prompt, completion) tokens when the chunk carries usage, counts that are not integers as None."""

    choice: bool
    content: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    usage: tuple[int | None, int | None] | None = None


class ChatClient:
    """`POST {base_url}/chat/completions` with streaming, `GET {base_url}/models`, through the `transport` named
    (`auto`: `aiohttp` for plain `http://`, `httpx` for `https://`) or an injected `httpx.AsyncClient` (tests, custom
    transports; never closed by `aclose`). Credentials in the base URL are dropped: the API key is the only one sent."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        connect_timeout_s: float = 5.0,
        first_byte_timeout_s: float = 60.0,
        http_client: httpx.AsyncClient | None = None,
        transport: TransportName = "auto",
    ) -> None:
        if api_key is not None and (_BREAKS.search(api_key) or not api_key.isascii()):
            raise ValueError("the API key holds a line break, a NUL or a non-ASCII character: it cannot go in a header")
        root = without_credentials(base_url.rstrip("/"))
        parts = urlsplit(root)
        parts.port  # noqa: B018 (raises ValueError for a port out of range, which no client could connect to)
        self._chat_url, self._models_url = f"{root}/chat/completions", f"{root}/models"
        self._headers = {
            "authorization": f"Bearer {api_key or NO_API_KEY}",
            "content-type": "application/json",
            "accept-encoding": "identity",
        }
        self._timeouts = Timeouts(connect_s=connect_timeout_s, read_s=first_byte_timeout_s)
        self._transport = _transport(transport, parts.scheme, http_client)

    async def chunks(
        self, body: Mapping[str, object], headers: Mapping[str, str] | None = None
    ) -> AsyncGenerator[Chunk, None]:
        """The answer's chunks as they arrive. Close the generator (`contextlib.aclosing`) to let the connection go
        before the end. Raises `StageHttpError`s only."""
        sent = self._headers | _checked(headers) if headers else self._headers
        exchange = self._transport.exchange("POST", self._chat_url, orjson.dumps(body), sent, self._timeouts)
        async with exchange as response:
            await _check(response)
            async for chunk in _chunks(response):
                yield chunk

    async def model_ids(self, timeout_s: float) -> list[str]:
        """The ids `GET /models` lists. Raises `StageHttpError`s only."""
        timeouts = Timeouts(connect_s=min(timeout_s, self._timeouts.connect_s), read_s=timeout_s)
        try:
            async with asyncio.timeout(timeout_s):
                exchange = self._transport.exchange("GET", self._models_url, None, self._headers, timeouts)
                async with exchange as response:
                    content = await _head(response, MAX_EVENT_BYTES)
        except TimeoutError as exc:
            raise StageTimedOut("did not answer in time") from exc
        if not _ok(response):
            raise StageStatus(response.status, _error_body(content), response.headers)
        try:
            page = orjson.loads(content)
        except orjson.JSONDecodeError as exc:
            raise StageMalformed(f"sent a model list that is not JSON ({exc})") from None
        entries = page.get("data") if isinstance(page, dict) else None
        if not isinstance(entries, list):
            raise StageMalformed(f"sent a model list without `data`: {clip(page)}")
        return [str(entry.get("id", "")) for entry in entries if isinstance(entry, dict)]

    async def aclose(self) -> None:
        await self._transport.aclose()


def _transport(name: TransportName, scheme: str, http_client: httpx.AsyncClient | None) -> Transport:
    if http_client is not None:
        return HttpxTransport(http_client, owned=False)
    if name == "aiohttp" or (name == "auto" and scheme == "http"):
        return AiohttpTransport()
    return httpx_transport()


def without_credentials(url: str) -> str:
    """`url` without the `user:password@` of its authority."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _checked(headers: Mapping[str, str]) -> dict[str, str]:
    """`headers`, names in lower case; `StageUnreachable` (before anything is sent) when one is not a header: a name
    that is not an HTTP token, a value with a line break, a NUL or a character outside ASCII."""
    if any(
        not _TOKEN.fullmatch(name) or _BREAKS.search(value) or not value.isascii() for name, value in headers.items()
    ):
        raise StageUnreachable("could not be reached (a request header is malformed; nothing was sent)")
    return {name.lower(): value for name, value in headers.items()}


def _ok(response: Response) -> bool:
    return 200 <= response.status < 300


async def _check(response: Response) -> None:
    if not _ok(response):
        head = await _head(response, MAX_ERROR_BODY_BYTES)
        raise StageStatus(response.status, _error_body(head), response.headers)
    content_type = response.headers.get("content-type", "")
    if not content_type.lower().startswith("text/event-stream"):
        shown = content_type or "no content type"
        raise StageMalformed(f"answered a streaming request with {shown!r}, not text/event-stream")


async def _head(response: Response, limit: int) -> bytes:
    """At most `limit` bytes of the body (an error page may be huge)."""
    parts: list[bytes] = []
    size = 0
    async for part in response.body:
        parts.append(part)
        size += len(part)
        if size >= limit:
            break
    return b"".join(parts)[:limit]


def _error_body(raw: bytes) -> object:
    """The `error` object of an OpenAI-style error body, else the whole JSON value, else the text."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace").strip()
    return data.get("error", data) if isinstance(data, dict) else data


async def _chunks(response: Response) -> AsyncIterator[Chunk]:
    """The event stream's chunks; an empty stream, or one with no `finish_reason`, is `StageMalformed` after the
    chunks it did hold."""
    seen = finished = done = False
    async for name, data in _events(response.body):
        done = done or data.startswith(DONE)
        if done:  # read on to the end of the body, so that the connection can serve the next request
            continue
        chunk = _chunk(name, data)
        seen = True
        finished = finished or chunk.finish_reason is not None
        yield chunk
    if not seen:
        raise StageMalformed("sent an empty stream")
    if not finished:
        raise StageMalformed("ended the stream without a finish_reason: the answer was cut off")


async def _events(body: AsyncIterator[bytes]) -> AsyncIterator[tuple[str, bytes]]:
    """(event name, data) of each server-sent event: `data:` lines joined by newlines, comments and other fields
    skipped, a byte order mark at the start dropped, a last event without its blank line still delivered."""
    pending, start = b"", True
    name, data, size = "", list[bytes](), 0
    async for piece in body:
        buffer = pending + piece
        if start:
            if BOM.startswith(buffer):  # not yet enough bytes to tell
                pending = buffer
                continue
            buffer, start = buffer.removeprefix(BOM), False
        lines = buffer.split(b"\n")
        pending = lines.pop()
        if len(pending) > MAX_EVENT_BYTES:
            raise StageMalformed(f"sent a line of more than {MAX_EVENT_BYTES} bytes")
        for line in lines:
            line = line.removesuffix(b"\r")
            if not line:
                if data:
                    yield name, b"\n".join(data)
                name, data, size = "", [], 0
                continue
            field, _, value = line.partition(b":")
            value = value.removeprefix(b" ")
            if field == b"data":
                data.append(value)
                size += len(value)
                if size > MAX_EVENT_BYTES:
                    raise StageMalformed(f"sent an event of more than {MAX_EVENT_BYTES} bytes")
            elif field == b"event":
                name = value.decode("utf-8", "replace")
    if pending.removesuffix(b"\r").startswith(b"data:"):
        data.append(pending.removesuffix(b"\r")[5:].removeprefix(b" "))
    if data:
        yield name, b"\n".join(data)


def _chunk(name: str, data: bytes) -> Chunk:
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise StageMalformed(f"sent a malformed stream (JSONDecodeError: {exc})") from None
    if name == "error" or (isinstance(event, dict) and event.get("error")):
        raise StageErrorEvent(event.get("error", event) if isinstance(event, dict) else event)
    choices = event.get("choices") if isinstance(event, dict) else None
    if not isinstance(choices, list):
        raise StageMalformed(f"sent a chunk without choices: {clip(event)}")
    usage = _usage(event.get("usage"))
    if not choices:
        return Chunk(choice=False, usage=usage)
    choice = choices[0]
    if not isinstance(choice, dict):
        raise StageMalformed(f"sent a malformed choice: {clip(choice)}")
    delta = choice.get("delta")
    delta = delta if isinstance(delta, dict) else {}
    finish = choice.get("finish_reason")
    return Chunk(
        choice=True,
        content=_text(delta.get("content")),
        reasoning=_text(delta.get("reasoning_content")) or _text(delta.get("reasoning")),
        finish_reason=FINISH_ALIASES.get(finish, finish) if isinstance(finish, str) else None,
        usage=usage,
    )


def _usage(usage: object) -> tuple[int | None, int | None] | None:
    if not isinstance(usage, dict):
        return None
    return _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""
