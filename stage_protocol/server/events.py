"""A streamed answer as server-sent events: the chunks of its `Delta`s, and `[DONE]`.

A failure after a stream has started is sent in-band as `data: {"error": {...}}`, followed by `data: [DONE]`, so a
client never mistakes a cut stream for a finished one; a failure before it starts still gets its HTTP status
(`primed`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from fastapi.responses import StreamingResponse
from openai.types.chat import chat_completion_chunk as chunk_types

from stage_protocol.backend import Delta
from stage_protocol.server.errors import ApiError, Failure, Status
from stage_protocol.server.openai import Reply

T = TypeVar("T")
SSE_DONE = "data: [DONE]\n\n"
INCOMPLETE_STREAM = Status(502, "incomplete_stream")


async def chat_events(
    reply: Reply, pieces: AsyncIterator[Delta], *, include_usage: bool, on_error: Callable[[Exception], Failure]
) -> AsyncIterator[str]:
    """The SSE events of a streamed answer: the role, thinking and text deltas, the finish reason, the usage chunk
    when asked for, and `[DONE]`. An error while streaming (a stream that ends without a finish reason included)
    becomes an in-band `{"error": ...}` event before `[DONE]`."""
    yield reply.chunk(chunk_types.ChoiceDelta(role="assistant", content=""))
    try:
        async with closing(pieces):
            async for piece in pieces:
                if piece.thinking:
                    yield reply.chunk(chunk_types.ChoiceDelta(reasoning_content=piece.thinking))
                if piece.text or piece.finish_reason:
                    yield reply.chunk(chunk_types.ChoiceDelta(content=piece.text or None), piece.finish_reason)
                if piece.finish_reason:
                    if include_usage:
                        yield reply.usage_chunk(piece)
                    break
            else:
                raise ApiError(INCOMPLETE_STREAM, "the backend's answer ended without a finish reason")
    except Exception as exc:
        yield f"data: {json.dumps(on_error(exc).body(), ensure_ascii=False)}\n\n"
    yield SSE_DONE


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    """`events` as a `text/event-stream` response that proxies neither cache nor buffer."""
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


async def primed(pieces: AsyncIterator[T]) -> AsyncIterator[T]:
    """`pieces` with its first item already taken, so errors raised before the answer starts raise here, while an
    HTTP status can still say so. Iterate the returned iterator to get every item, the first included."""
    first = await anext(pieces, None)
    if first is None:
        raise ApiError(INCOMPLETE_STREAM, "the backend's answer was empty: it ended before its first piece")

    async def chained() -> AsyncIterator[T]:
        async with closing(pieces):
            yield first
            async for piece in pieces:
                yield piece

    return chained()


@asynccontextmanager
async def closing(iterator: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """Close `iterator` on leaving (an async generator's `aclose`), so an abandoned answer stops being generated."""
    try:
        yield iterator
    finally:
        close = getattr(iterator, "aclose", None)
        if close is not None:
            await close()
