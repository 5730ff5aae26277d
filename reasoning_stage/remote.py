"""The `remote` reasoning backend: any OpenAI-compatible `/v1/chat/completions` server (our `reasoning_stage` server,
vLLM, SGLang, llama.cpp's server, Ollama, a vendor API).

The request's messages go as they are, with `max_tokens=max_new_tokens` and its `temperature`. Answers are always
streamed (`stream_options.include_usage`): `stream` yields `ReasoningDelta`s as they arrive, and `generate` is
`stream` collected, so both behave alike. Thinking arrives in the non-standard delta field `reasoning_content`
(vLLM up to 0.11, SGLang) or `reasoning` (newer vLLM), or as a `<think>…</think>` block at the start of the content
when the server runs no reasoning parser; it becomes `thinking`, never `text`. One case only `generate` can see: a
`</think>` whose opening tag was in the prompt (the chat template's), since a stream cannot know it was thinking until
the block closes; `stream` passes such text through, and `generate` moves what precedes `</think>` to `thinking`.

The last delta carries the finish reason and the token counts of the server's final usage chunk; a server that sends
no usage gives `None` there, which `generate` reports as 0 tokens.

Errors are translated in `translate_error` (foreign exceptions) and `_finish_reason` (the stream's own verdict):

| what happened                                                   | raised                                   |
| --------------------------------------------------------------- | ---------------------------------------- |
| connection refused or reset, DNS failure, timeout               | `ReasoningUnavailable`; `retryable`      |
|                                                                 | False once a delta had arrived           |
| HTTP 408, 429 or 5xx                                            | `ReasoningUnavailable`, `retry_after_s`  |
|                                                                 | from `Retry-After` (seconds or a date)   |
| other HTTP 4xx (bad request, context too long, unknown model)   | `ReasoningRejected`                      |
| an error event inside the stream                                | by its `code`, as a status; no code:     |
|                                                                 | `ReasoningUnavailable`                   |
| a 200 not `text/event-stream`, an event not JSON, a chunk       | `ReasoningInvalidOutput`                 |
| without `choices`, no chunk at all, a stream ending before a    |                                          |
| `finish_reason` (cut mid-answer; after the deltas so far)       |                                          |
| `finish_reason` `content_filter`                                | `ReasoningRejected`                      |
| `finish_reason` `abort` or `error` (the server gave up)         | `ReasoningUnavailable`                   |
| any other `finish_reason` than `stop` or `length`               | `ReasoningInvalidOutput`                 |
| more than `MAX_CHARS_PER_TOKEN` characters per requested token  | `ReasoningInvalidOutput`                 |

Timeouts: `connect_timeout_s` to connect; `first_byte_timeout_s` for the longest silence, before the answer begins
and between its parts; `timeout_s` for one answer in all (the read of each delta is bounded by what is left of it, so
a slow trickle ends too).

Every message names the backend, the server's base URL and the model.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import aclosing
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Literal, cast

import httpx
from openai import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AsyncOpenAI,
    AsyncStream,
    OpenAIError,
    Timeout,
)
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam
from openai.types.chat.chat_completion_chunk import Choice

from reasoning_stage.backend import Health
from reasoning_stage.errors import (
    ReasoningDisabled,
    ReasoningError,
    ReasoningInvalidOutput,
    ReasoningRejected,
    ReasoningUnavailable,
)
from reasoning_stage.types import ChatMessage, FinishReason, ReasoningDelta, ReasoningRequest, ReasoningResult

if TYPE_CHECKING:
    import httpx2

NO_API_KEY = "EMPTY"
"""Sent when no key is configured: vLLM and SGLang accept any key unless started with one."""
HEALTH_TIMEOUT_S = 10.0
RETRYABLE_STATUSES = frozenset({408, 429})
"""With every 5xx: the statuses that mean "not now" rather than "not this request"."""
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
MAX_CHARS_PER_TOKEN = 32
"""A server that sends more text than this per requested token is not honouring `max_tokens`: cut it off."""


class RemoteReasoningBackend:
    """The `remote` reasoning backend over an `AsyncOpenAI` client (built by `load`, or injected)."""

    name = "remote"

    def __init__(
        self,
        client: AsyncOpenAI,
        *,
        base_url: str,
        model: str,
        timeout_s: float = 120.0,
        headers: Callable[[], Mapping[str, str]] | None = None,
        owns_client: bool = True,
    ) -> None:
        self.model = model
        self._headers = headers
        self.base_url = base_url
        self._timeout_s = timeout_s
        self._client = client
        self._base_url = base_url
        self._owns_client = owns_client
        self._closed = False
        self._where = f"the remote reasoning backend ({base_url}, model {model!r})"

    @classmethod
    async def load(
        cls,
        *,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 5.0,
        first_byte_timeout_s: float = 60.0,
        headers: Callable[[], Mapping[str, str]] | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> RemoteReasoningBackend:
        """Build the client; nothing is sent (see `health`). Timeouts as in the module docstring; retries are left
        to the caller (`max_retries=0`).

        `headers` gives extra headers for each request (the orchestrator sends its request id). `http_client` (tests,
        custom transports) is used as is and never closed by `aclose`."""
        if httpx.URL(base_url).scheme not in ("http", "https"):
            raise ValueError(f"the remote reasoning backend needs an http(s) base URL, got {base_url!r}")
        client = AsyncOpenAI(
            base_url=base_url,
            api_key=api_key or NO_API_KEY,
            timeout=Timeout(first_byte_timeout_s, connect=connect_timeout_s),
            max_retries=0,
            # openai 3 is typed for httpx2 but takes an httpx.AsyncClient too (its `_httpx2` compatibility shims)
            http_client=cast("httpx2.AsyncClient | None", http_client),
        )
        return cls(
            client,
            base_url=base_url,
            model=model,
            timeout_s=timeout_s,
            headers=headers,
            owns_client=http_client is None,
        )

    async def generate(self, request: ReasoningRequest) -> ReasoningResult:
        """`stream` collected. Token counts are 0 when the server sent no usage."""
        started = time.perf_counter()
        text: list[str] = []
        thinking: list[str] = []
        last = ReasoningDelta()
        async for delta in self.stream(request):
            text.append(delta.text)
            thinking.append(delta.thinking)
            last = delta
        if last.finish_reason is None:  # `stream` ends with the finish reason or raises; kept for the type checker
            raise ReasoningInvalidOutput(f"{self._where} ended without a finish reason")
        late_thinking, answer = _late_thinking("".join(text))
        parts = [part for part in ("".join(thinking).strip(), late_thinking) if part]
        return ReasoningResult(
            backend=self.name,
            model=self.model,
            text=answer,
            prompt_tokens=last.prompt_tokens or 0,
            completion_tokens=last.completion_tokens or 0,
            finish_reason=last.finish_reason,
            latency_ms=(time.perf_counter() - started) * 1000,
            thinking="\n".join(parts) or None,
        )

    async def stream(self, request: ReasoningRequest) -> AsyncIterator[ReasoningDelta]:
        """Deltas of text or thinking as they arrive; the last one holds the finish reason and token counts."""
        if self._closed:
            raise ReasoningUnavailable(f"{self._where} is closed")
        deadline = asyncio.get_running_loop().time() + self._timeout_s
        progress = _Progress(max_chars=MAX_CHARS_PER_TOKEN * request.max_new_tokens)
        try:
            async with asyncio.timeout_at(deadline):
                stream = await self._client.chat.completions.create(
                    model=self.model,
                    messages=[_message(message) for message in request.messages],
                    temperature=request.temperature,
                    max_tokens=request.max_new_tokens,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_headers=dict(self._headers()) if self._headers else None,
                )
            async with stream, aclosing(_deltas(stream, self._where)) as deltas:
                _check_event_stream(stream.response.headers.get("content-type", ""), self._where)
                while True:
                    async with asyncio.timeout_at(deadline):  # the read only: never around the consumer's time
                        delta = await anext(deltas, None)
                    if delta is None:
                        return
                    progress.add(delta.text + delta.thinking, self._where)
                    yield delta
        except TimeoutError as exc:
            raise ReasoningUnavailable(
                f"{self._where} did not finish its answer within {self._timeout_s:g} s", retryable=not progress.chars
            ) from exc
        except (OpenAIError, ValueError) as exc:  # ValueError: an event that is not JSON, or not UTF-8
            error = translate_error(exc, self._where)
            if progress.chars and isinstance(error, ReasoningUnavailable):
                error = ReasoningUnavailable(f"{error} (after part of the answer had arrived)", retryable=False)
            raise error from exc

    async def health(self) -> Health:
        """`GET {base_url}/models`: ok when the server answers and serves the model. Never raises."""
        if self._closed:
            return Health(ok=False, detail="closed")
        try:
            page = await self._client.models.list(timeout=HEALTH_TIMEOUT_S)
            served = [str(getattr(entry, "id", "")) for entry in page.data]
        except Exception as exc:  # health reports every failure, whatever raised it
            error = translate_error(exc, self._where) if isinstance(exc, OpenAIError) else exc
            return Health(ok=False, detail=f"{type(error).__name__}: {error}")
        if self.model not in served:
            return Health(ok=False, detail=f"{self._where} is up but serves only: {', '.join(served) or 'nothing'}")
        return Health(ok=True, detail=f"{self._base_url} serves {self.model!r}")

    async def aclose(self) -> None:
        """Close the client, unless its HTTP client was injected (the injector closes that)."""
        self._closed = True
        if self._owns_client:
            await self._client.close()


class _Progress:
    """How much of the answer has arrived; more than `max_chars` is `ReasoningInvalidOutput`."""

    def __init__(self, max_chars: int) -> None:
        self.chars = 0
        self._max_chars = max_chars

    def add(self, text: str, where: str) -> None:
        self.chars += len(text)
        if self.chars > self._max_chars:
            raise ReasoningInvalidOutput(f"{where} sent more than {self._max_chars} characters: max_tokens ignored?")


def _message(message: ChatMessage) -> ChatCompletionMessageParam:
    if message.role == "system":
        return {"role": "system", "content": message.content}
    if message.role == "assistant":
        return {"role": "assistant", "content": message.content}
    return {"role": "user", "content": message.content}


def _check_event_stream(content_type: str, where: str) -> None:
    if not content_type.lower().startswith("text/event-stream"):
        shown = content_type or "no content type"
        raise ReasoningInvalidOutput(f"{where} answered a streaming request with {shown!r}, not text/event-stream")


async def _deltas(stream: AsyncStream[ChatCompletionChunk], where: str) -> AsyncGenerator[ReasoningDelta, None]:
    """The stream as deltas, ending with the finish reason and usage; no chunk, or no finish reason (a stream cut
    mid-answer), is `ReasoningInvalidOutput` after the deltas already yielded."""
    splitter = _ThinkSplitter()
    finish: FinishReason | None = None
    usage: tuple[int | None, int | None] = (None, None)
    chunks = 0
    async for chunk in stream:
        chunks += 1
        choice = _first_choice(chunk, where)
        usage = _usage(chunk) or usage
        if choice is None:  # the usage chunk
            continue
        text, thinking = splitter.feed(_text(getattr(choice.delta, "content", None)))
        thinking = _reasoning(choice) + thinking
        if text or thinking:
            yield ReasoningDelta(text=text, thinking=thinking)
        if isinstance(choice.finish_reason, str):
            finish = _finish_reason(choice.finish_reason, where)
    if chunks == 0:
        raise ReasoningInvalidOutput(f"{where} sent an empty stream")
    if finish is None:
        raise ReasoningInvalidOutput(f"{where} ended the stream without a finish_reason: the answer was cut off")
    text, thinking = splitter.flush()
    if text or thinking:
        yield ReasoningDelta(text=text, thinking=thinking)
    yield ReasoningDelta(finish_reason=finish, prompt_tokens=usage[0], completion_tokens=usage[1])


def _first_choice(chunk: object, where: str) -> Choice | None:
    choices = getattr(chunk, "choices", None)
    if not isinstance(chunk, ChatCompletionChunk) or not isinstance(choices, list):
        raise ReasoningInvalidOutput(f"{where} sent a chunk without choices: {_clip(chunk)}")
    if not choices:
        return None
    if not isinstance(choices[0], Choice):
        raise ReasoningInvalidOutput(f"{where} sent a malformed choice: {_clip(choices[0])}")
    return choices[0]


def _usage(chunk: ChatCompletionChunk) -> tuple[int | None, int | None] | None:
    """(prompt, completion) tokens of a chunk carrying usage; counts that are not integers read as None."""
    usage = chunk.usage
    if usage is None:
        return None
    return _count(getattr(usage, "prompt_tokens", None)), _count(getattr(usage, "completion_tokens", None))


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _reasoning(choice: Choice) -> str:
    """The delta's thinking: `reasoning_content` (vLLM up to 0.11, SGLang), else `reasoning` (newer vLLM)."""
    return _text(getattr(choice.delta, "reasoning_content", None)) or _text(getattr(choice.delta, "reasoning", None))


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _finish_reason(reason: str, where: str) -> FinishReason:
    if reason == "stop":
        return "stop"
    if reason == "length":
        return "length"
    if reason == "content_filter":
        raise ReasoningRejected(f"{where} refused to answer (finish_reason content_filter)")
    if reason in ("abort", "error"):
        raise ReasoningUnavailable(f"{where} gave up on the request (finish_reason {reason})")
    raise ReasoningInvalidOutput(f"{where} stopped for an unexpected reason: finish_reason {reason!r}")


class _ThinkSplitter:
    """Splits streamed content into answer text and a leading `<think>…</think>` block, whatever the chunk
    boundaries: text that may be the start of a tag is held back until the next piece decides."""

    def __init__(self) -> None:
        self._state: Literal["start", "thinking", "after", "text"] = "start"
        self._pending = ""

    def feed(self, piece: str) -> tuple[str, str]:
        """(text, thinking) released by `piece`."""
        self._pending += piece
        text: list[str] = []
        thinking: list[str] = []
        while self._pending and self._step(text, thinking):
            pass
        return "".join(text), "".join(thinking)

    def flush(self) -> tuple[str, str]:
        """(text, thinking) still held at the end; an unclosed block is thinking cut by the token limit."""
        pending, self._pending = self._pending, ""
        if self._state == "thinking":
            return "", pending
        return (pending if self._state == "text" else pending.strip()), ""

    def _step(self, text: list[str], thinking: list[str]) -> bool:
        """Release what the state allows; False when more input is needed."""
        pending = self._pending
        if self._state == "text":
            text.append(pending)
            self._pending = ""
            return False
        if self._state == "thinking":
            end = pending.find(THINK_CLOSE)
            if end < 0:
                keep = len(pending) - _partial_tag(pending, THINK_CLOSE)
                thinking.append(pending[:keep])
                self._pending = pending[keep:]
                return False
            thinking.append(pending[:end])
            self._pending, self._state = pending[end + len(THINK_CLOSE) :], "after"
            return True
        stripped = pending.lstrip()
        if not stripped or (self._state == "start" and THINK_OPEN.startswith(stripped)):
            return False  # blanks so far, or maybe an opening tag split across chunks
        if self._state == "start" and stripped.startswith(THINK_OPEN):
            self._pending, self._state = stripped[len(THINK_OPEN) :], "thinking"
        else:
            self._pending, self._state = stripped, "text"
        return True


def _partial_tag(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (0 when none)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


def _late_thinking(text: str) -> tuple[str, str]:
    """(thinking, answer) of collected text still holding a `</think>` whose opening tag was in the prompt."""
    if THINK_CLOSE not in text:
        return "", text.strip()
    head, _, answer = text.partition(THINK_CLOSE)
    return head.strip(), answer.strip()


def translate_error(exc: Exception, where: str) -> ReasoningError:
    """Map an exception of the `openai` client, or the `ValueError` of a stream event that is not JSON (or not
    UTF-8), into the reasoning error tree."""
    if isinstance(exc, APITimeoutError):
        return ReasoningUnavailable(f"{where} did not answer in time")
    if isinstance(exc, APIConnectionError):
        cause = exc.__cause__
        reason = f"{type(cause).__name__}: {cause}" if cause else exc.message
        return ReasoningUnavailable(f"{where} could not be reached ({reason})")
    if isinstance(exc, APIStatusError):
        headers = exc.response.headers
        known = _stage_error(exc.body, where)
        if known is not None:
            return known
        return _status_error(exc.status_code, _detail(exc.body, exc.message), where, retry_after_s(headers))
    if isinstance(exc, APIError):  # an error event inside a 200 stream
        code = exc.body.get("code") if isinstance(exc.body, dict) else None
        status = int(code) if isinstance(code, int | str) and str(code).isdigit() else None
        return _status_error(status, _detail(exc.body, exc.message), where, None, in_stream=True)
    return ReasoningInvalidOutput(f"{where} sent a malformed stream ({type(exc).__name__}: {exc})")


STAGE_SERVER_CODES: dict[str, type[ReasoningError]] = {
    "reasoning_invalid_output": ReasoningInvalidOutput,
    "reasoning_disabled": ReasoningDisabled,
}
"""Error codes of our own reasoning stage server (`reasoning_stage.server`) that keep their error class across the
hop; other codes map by HTTP status."""


def _stage_error(body: object, where: str) -> ReasoningError | None:
    code = body.get("code") if isinstance(body, dict) else None
    cls = STAGE_SERVER_CODES.get(code) if isinstance(code, str) else None
    return cls(f"{where}: {_detail(body, code or '')}") if cls is not None else None


def _status_error(
    status: int | None, detail: str, where: str, retry_after: float | None, *, in_stream: bool = False
) -> ReasoningError:
    what = f"an error event (code {status})" if in_stream else f"HTTP {status}"
    if status is not None and 400 <= status < 500 and status not in RETRYABLE_STATUSES:
        return ReasoningRejected(f"{where} refused the request with {what}: {detail}")
    return ReasoningUnavailable(f"{where} answered {what}: {detail}", retry_after_s=retry_after)


def _detail(body: object, fallback: str) -> str:
    """The server's own words: `error.message` of an OpenAI-style body, else the body's text."""
    message = body.get("message") if isinstance(body, dict) else body
    return _clip(message) if isinstance(message, str) and message else fallback


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from a `Retry-After` header: delay-seconds or an HTTP date; None when absent or unreadable."""
    value = (headers.get("retry-after") or "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _clip(value: object, limit: int = 300) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "…"
