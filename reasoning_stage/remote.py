"""The `remote` reasoning backend: any OpenAI-compatible `/v1/chat/completions` server (our `reasoning_stage` server,
vLLM, SGLang, llama.cpp's server, Ollama, a vendor API).

The request's messages go as they are, with `max_new_tokens` as the token limit, its `temperature` and those of its
optional sampling fields the server takes, in the server's dialect (`stage_protocol.client.dialects`: the GLM open
platform, for one, gets `thinking: {"type": "disabled"}`, since it thinks by default and would spend the token budget on
it, `do_sample: false` for greedy decoding, and of the sampling fields only `top_p` and `stop`).
Answers are always streamed: `stream` yields `ReasoningDelta`s as they arrive, and `generate` is
`stream` collected, so both behave alike. Thinking arrives in the non-standard delta field `reasoning_content`
(vLLM up to 0.11, SGLang) or `reasoning` (newer vLLM), or as a `<think>…</think>` block at the start of the content
when the server runs no reasoning parser; it becomes `thinking`, never `text`. One case only `generate` can see: a
`</think>` whose opening tag was in the prompt (the chat template's), since a stream cannot know it was thinking until
the block closes; `stream` passes such text through, and `generate` moves what precedes `</think>` to `thinking` (and
keeps only what is inside `<answer>…</answer>` tags, `stage_protocol.model_text.split_thinking`).

The last delta carries the finish reason and the token counts of the server's final usage chunk; a server that sends
no usage gives `None` there, which `generate` reports as 0 tokens. An answer that falls into a loop
(`stage_protocol.loops.LoopWatch`) is left there: the stream is closed, which stops the server's generation, and the
last delta says `stop` with no counts (the orchestrator then finds the answer degenerate).

The request and the stream go through `stage_protocol.ChatClient`, which checks each chunk's shape. Errors are
translated in `translate_error` (foreign exceptions) and `_finish_reason` (the stream's own verdict), as
`stage_protocol.client.failures` classifies them:

| what happened                                                   | raised                                   |
| --------------------------------------------------------------- | ---------------------------------------- |
| connection refused or reset, DNS failure, timeout               | `ReasoningUnavailable`; `retryable`      |
|                                                                 | False once a delta had arrived           |
| HTTP 408, 429 or 5xx                                            | `ReasoningUnavailable`, `retry_after_s`  |
|                                                                 | from `Retry-After` (seconds or a date)   |
| an exhausted account balance (the GLM open platform's 1113)     | `ReasoningUnavailable`, not retryable    |
| other HTTP 4xx (bad request, context too long, unknown model,   | `ReasoningRejected`                      |
| a vendor's safety refusal)                                      |                                          |
| an error event inside the stream                                | by its `code`, as a status (100–599) or  |
|                                                                 | a vendor code; else unavailable          |
| a 200 not `text/event-stream`, an event not JSON, a chunk       | `ReasoningInvalidOutput`                 |
| without `choices`, no chunk at all, a stream ending before a    |                                          |
| `finish_reason` (cut mid-answer; after the deltas so far)       |                                          |
| `finish_reason` `content_filter` or `sensitive`                 | `ReasoningRejected`                      |
| `finish_reason` `abort`, `error` or `network_error`             | `ReasoningUnavailable`                   |
| any other `finish_reason` than `stop` or `length`               | `ReasoningInvalidOutput`                 |
| more than `MAX_CHARS_PER_TOKEN` characters per requested token  | `ReasoningInvalidOutput`                 |

Timeouts: `connect_timeout_s` to connect; `first_byte_timeout_s` for the longest silence, before the answer begins
and between its parts; `timeout_s` for one answer in all (the read of each delta is bounded by what is left of it, so
a slow trickle ends too).

Every message names the backend, the server's base URL and the model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import aclosing
from typing import Literal

import httpx

from reasoning_stage.backend import Health
from reasoning_stage.errors import (
    ReasoningDisabled,
    ReasoningError,
    ReasoningInvalidOutput,
    ReasoningRejected,
    ReasoningUnavailable,
)
from reasoning_stage.types import (
    ChatMessage,
    Collected,
    FinishReason,
    ReasoningDelta,
    ReasoningRequest,
    ReasoningResult,
)
from stage_protocol.client import (
    ChatClient,
    Chunk,
    Dialect,
    DialectName,
    ErrorTree,
    StageHttpError,
    classify,
    dialect,
    finish_failure,
)
from stage_protocol.loops import LoopWatch
from stage_protocol.model_text import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN

HEALTH_TIMEOUT_S = 10.0
MAX_CHARS_PER_TOKEN = 32
"""A server that sends more text than this per requested token is not honouring `max_tokens`: cut it off."""


class RemoteReasoningBackend:
    """The `remote` reasoning backend over a `stage_protocol.ChatClient` (built by `load`, or injected)."""

    name = "remote"

    def __init__(
        self,
        client: ChatClient,
        *,
        base_url: str,
        model: str,
        timeout_s: float = 120.0,
        headers: Callable[[], Mapping[str, str]] | None = None,
        speaks: Dialect | None = None,
    ) -> None:
        self.model = model
        self.dialect = speaks or dialect("auto")
        self.base_url = base_url
        self._headers = headers
        self._timeout_s = timeout_s
        self._client = client
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
        dialect_name: DialectName = "auto",
    ) -> RemoteReasoningBackend:
        """Build the client; nothing is sent (see `health`). Timeouts as in the module docstring; retries are left
        to the caller.

        `headers` gives extra headers for each request (the orchestrator sends its request id). `http_client` (tests,
        custom transports) is used as is and never closed by `aclose`."""
        if httpx.URL(base_url).scheme not in ("http", "https"):
            raise ValueError(f"the remote reasoning backend needs an http(s) base URL, got {base_url!r}")
        client = ChatClient(
            base_url,
            api_key=api_key,
            connect_timeout_s=connect_timeout_s,
            first_byte_timeout_s=first_byte_timeout_s,
            http_client=http_client,
        )
        return cls(
            client, base_url=base_url, model=model, timeout_s=timeout_s, headers=headers, speaks=dialect(dialect_name)
        )

    async def generate(self, request: ReasoningRequest) -> ReasoningResult:
        """`stream` collected. Token counts are 0 when the server sent no usage."""
        collected = Collected()
        async for delta in self.stream(request):
            collected.add(delta)
        return collected.result(self.name, self.model, where=self._where)

    async def stream(self, request: ReasoningRequest) -> AsyncIterator[ReasoningDelta]:
        """Deltas of text or thinking as they arrive; the last one holds the finish reason and token counts."""
        if self._closed:
            raise ReasoningUnavailable(f"{self._where} is closed")
        deadline = asyncio.get_running_loop().time() + self._timeout_s
        progress = _Progress(max_chars=MAX_CHARS_PER_TOKEN * request.max_new_tokens)
        body = self.dialect.chat_body(
            self.model,
            [_message(message) for message in request.messages],
            max_tokens=request.max_new_tokens,
            temperature=request.temperature,
            sampling=request.sampling.fields(),
        )
        chunks = self._client.chunks(body, self._headers() if self._headers else None)
        watch = LoopWatch()
        try:
            async with aclosing(chunks), aclosing(_deltas(chunks, self._where)) as deltas:
                while True:
                    async with asyncio.timeout_at(deadline):  # the read only: never around the consumer's time
                        delta = await anext(deltas, None)
                    if delta is None:
                        return
                    progress.add(delta.text + delta.thinking, self._where)
                    yield delta
                    if watch.add(delta.text):  # leaving the stream closes it: the server stops generating
                        yield ReasoningDelta(finish_reason="stop")
                        return
        except TimeoutError as exc:
            raise ReasoningUnavailable(
                f"{self._where} did not finish its answer within {self._timeout_s:g} s", retryable=not progress.chars
            ) from exc
        except StageHttpError as exc:
            raise translate_error(exc, self._where, midway=progress.chars > 0, speaks=self.dialect) from exc

    async def health(self) -> Health:
        """`GET {base_url}/models`: ok when the server answers and serves the model. Never raises."""
        if self._closed:
            return Health(ok=False, detail="closed")
        try:
            served = await self._client.model_ids(HEALTH_TIMEOUT_S)
        except Exception as exc:  # health reports every failure, whatever raised it
            error = translate_error(exc, self._where, speaks=self.dialect) if isinstance(exc, StageHttpError) else exc
            return Health(ok=False, detail=f"{type(error).__name__}: {error}")
        if self.model not in served:
            return Health(ok=False, detail=f"{self._where} is up but serves only: {', '.join(served) or 'nothing'}")
        return Health(ok=True, detail=f"{self.base_url} serves {self.model!r}")

    async def aclose(self) -> None:
        """Close the client (its HTTP client too, unless that was injected)."""
        self._closed = True
        await self._client.aclose()


class _Progress:
    """How much of the answer has arrived; more than `max_chars` is `ReasoningInvalidOutput`."""

    def __init__(self, max_chars: int) -> None:
        self.chars = 0
        self._max_chars = max_chars

    def add(self, text: str, where: str) -> None:
        self.chars += len(text)
        if self.chars > self._max_chars:
            raise ReasoningInvalidOutput(f"{where} sent more than {self._max_chars} characters: max_tokens ignored?")


def _message(message: ChatMessage) -> dict[str, str]:
    return {"role": message.role, "content": message.content}


async def _deltas(chunks: AsyncIterator[Chunk], where: str) -> AsyncGenerator[ReasoningDelta, None]:
    """The chunks as deltas, ending with the finish reason and usage (the client raises on an empty or cut stream,
    after the deltas already yielded)."""
    splitter = _ThinkSplitter()
    finish: FinishReason = "stop"
    sent = False
    usage: tuple[int | None, int | None] = (None, None)
    async for chunk in chunks:
        usage = chunk.usage or usage
        if not chunk.choice:  # the usage chunk
            continue
        text, thinking = splitter.feed(chunk.content)
        thinking = chunk.reasoning + thinking
        if text or thinking:
            sent = True
            yield ReasoningDelta(text=text, thinking=thinking)
        if chunk.finish_reason is not None:
            finish = _finish_reason(chunk.finish_reason, where, midway=sent)
    text, thinking = splitter.flush()
    if text or thinking:
        yield ReasoningDelta(text=text, thinking=thinking)
    yield ReasoningDelta(finish_reason=finish, prompt_tokens=usage[0], completion_tokens=usage[1])


def _finish_reason(reason: str, where: str, *, midway: bool) -> FinishReason:
    failure = finish_failure(reason)
    if failure is not None:
        raise ERRORS.error(failure, where, midway=midway)
    return "length" if reason == "length" else "stop"


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
        return _without_answer_tags(pending if self._state == "text" else pending.strip()), ""

    def _step(self, text: list[str], thinking: list[str]) -> bool:
        """Release what the state allows; False when more input is needed."""
        pending = self._pending
        if self._state == "text":  # `<answer>` tags (GLM-4.1V-Thinking's) are dropped, wherever the chunks split them
            keep = len(pending) - max(_partial_tag(pending, ANSWER_OPEN), _partial_tag(pending, ANSWER_CLOSE))
            text.append(_without_answer_tags(pending[:keep]))
            self._pending = pending[keep:]
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


def _without_answer_tags(text: str) -> str:
    return text.replace(ANSWER_OPEN, "").replace(ANSWER_CLOSE, "")


def _partial_tag(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (0 when none)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


def translate_error(
    exc: StageHttpError, where: str, *, midway: bool = False, speaks: Dialect | None = None
) -> ReasoningError:
    """Map a failure of the stage client into the reasoning error tree (`stage_protocol.classify` says what it
    means)."""
    stream_codes = speaks.stream_error_codes if speaks is not None else True
    return ERRORS.error(classify(exc, stream_codes=stream_codes), where, midway=midway)


STAGE_SERVER_CODES: dict[str, type[ReasoningError]] = {
    "reasoning_invalid_output": ReasoningInvalidOutput,
    "reasoning_disabled": ReasoningDisabled,
}
"""Error codes of our own reasoning stage server (`reasoning_stage.server`) that keep their error class across the
hop; other codes map by HTTP status."""
ERRORS = ErrorTree[ReasoningError](ReasoningUnavailable, ReasoningRejected, ReasoningInvalidOutput, STAGE_SERVER_CODES)
