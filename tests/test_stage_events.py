"""The stage-protocol client's reading of an answer: the event stream's corners, the timeouts' two owners (ours
become `StageTimedOut`, the caller's stay `TimeoutError`), and error statuses."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import orjson
import pytest

from stage_protocol import client as protocol
from stage_protocol.client.chat import MAX_ERROR_BODY_BYTES, MAX_EVENT_BYTES
from tests.raw_http import (
    DONE,
    EVENTS,
    EXPECTED,
    STREAM,
    TRANSPORTS,
    Conn,
    Handler,
    Request,
    always,
    chunked,
    client_for,
    collect,
    collect_until_error,
    event,
    eventually,
    head,
    head_then_silent,
    one_by_one,
    one_event_then_silent,
    plain,
    response,
    serve,
    silent,
    sse,
)
from tests.servers import unused_port

# --- the event stream -------------------------------------------------------------------------------------------------


@asynccontextmanager
async def mocked(*pieces: bytes, content_type: str = "text/event-stream") -> AsyncIterator[protocol.ChatClient]:
    """A client whose every chat request is answered 200 with `pieces`, each arriving on its own."""

    async def stream() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": content_type}, content=stream())

    async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as http:
        yield protocol.ChatClient("http://stage.test/v1", http_client=http)


async def parsed(*pieces: bytes) -> list[protocol.Chunk]:
    async with mocked(*pieces) as client:
        return await collect(client)


async def parsed_until_error(*pieces: bytes) -> tuple[list[protocol.Chunk], protocol.StageHttpError]:
    async with mocked(*pieces) as client:
        return await collect_until_error(client)


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
    assert await parsed(data) == [
        protocol.Chunk(True, content="a"),
        protocol.Chunk(True, content="b", finish_reason="stop"),
    ]


@pytest.mark.parametrize("split", ["whole", "bytes"])
async def test_a_byte_order_mark_before_the_stream_is_skipped(split: str) -> None:
    data = b"\xef\xbb\xbf" + STREAM
    assert await parsed(*(one_by_one(data) if split == "bytes" else [data])) == EXPECTED


async def test_an_event_of_many_data_lines_is_bounded_like_one_long_line() -> None:
    line = b"data: " + b"x" * (64 * 1024) + b"\n"
    got, error = await parsed_until_error(*([line] * (MAX_EVENT_BYTES // len(line) + 2)))
    assert got == []
    assert isinstance(error, protocol.StageMalformed)
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
        client = protocol.ChatClient("http://stage.test/v1", http_client=http)
        with pytest.raises(protocol.StageMalformed, match=f"a line of more than {MAX_EVENT_BYTES} bytes"):
            await collect(client)
    assert pulled <= MAX_EVENT_BYTES // (1024 * 1024) + 1


@pytest.mark.parametrize("data", [b"", DONE, b": ping\n\n" + DONE, b"\n\n\n"])
async def test_a_stream_without_any_chunk_is_malformed(data: bytes) -> None:
    with pytest.raises(protocol.StageMalformed, match="empty stream"):
        await parsed(data)


@pytest.mark.parametrize("done", [True, False])
async def test_a_stream_without_a_finish_reason_is_cut_off_after_the_chunks_it_held(done: bool) -> None:
    got, error = await parsed_until_error(sse(*EVENTS[:4], done=done))
    assert got == EXPECTED[:4]
    assert isinstance(error, protocol.StageMalformed)
    assert "cut off" in str(error)
    assert protocol.classify(error).kind == "invalid"


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
    assert isinstance(error, protocol.StageErrorEvent)
    assert error.body == body
    words = body.get("message") if isinstance(body, dict) else body
    assert str(error) == f"sent an error event: {words}"
    failure = protocol.classify(error)
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
    assert isinstance(error, protocol.StageMalformed)
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
    assert await parsed(sse({"choices": [choice]})) == [protocol.Chunk(True, content, reasoning, "stop")]


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
    assert chunks == [protocol.Chunk(True, finish_reason="stop"), protocol.Chunk(False, usage=counts)]


async def test_usage_on_a_chunk_with_a_choice_is_kept() -> None:
    data = sse({"choices": [{"delta": {"content": "x"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 1}})
    assert await parsed(data) == [protocol.Chunk(True, "x", "", "stop", (1, None))]


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
            with pytest.raises(protocol.StageMalformed, match=re.escape(repr(content_type or "no content type"))):
                await collect(client)


# --- timeouts ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("handler", "before"),
    [(silent, []), (head_then_silent, []), (one_event_then_silent, EXPECTED[:1])],
    ids=["no-answer", "head-only", "mid-body"],
)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_silent_server_times_out_within_the_first_byte_timeout(
    transport: str, handler: Handler, before: list[protocol.Chunk]
) -> None:
    async with serve(handler) as server, client_for(transport, f"{server.url}/v1", first_byte_timeout_s=0.3) as client:
        started = time.monotonic()
        got, error = await collect_until_error(client)
        elapsed = time.monotonic() - started
        assert isinstance(error, protocol.StageTimedOut)
        assert got == before
        assert 0.25 < elapsed < 2
        assert protocol.classify(error).kind == "unavailable"
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
        with pytest.raises(protocol.StageUnreachable, match="ConnectError"):
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
        with pytest.raises(protocol.StageStatus) as caught:
            await collect(client)
    error = caught.value
    assert (error.status, error.body) == (status, body)
    assert error.headers.get("x-trace") == "t1"
    assert str(error) == f"answered HTTP {status}: {words}"
    failure = protocol.classify(error)
    assert (failure.kind, failure.detail) == (kind, words)
    assert failure.message.endswith(f"HTTP {status}: {words}")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_retry_after_is_read_from_the_response_headers(transport: str) -> None:
    answer = response(b'{"error":{"message":"slow down","code":"rate_limited"}}', 429, headers={"Retry-After": "7"})
    async with serve(always(answer)) as server, client_for(transport, f"{server.url}/v1") as client:
        with pytest.raises(protocol.StageStatus) as caught:
            await collect(client)
    assert protocol.retry_after_s(caught.value.headers) == 7.0
    assert protocol.classify(caught.value) == protocol.Failure(
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
        with pytest.raises(protocol.StageStatus) as caught:
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
