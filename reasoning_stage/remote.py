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

The request and the stream go through `stage_protocol.ChatClient`, which checks each chunk's shape. The client,
`health`, `aclose` and the translation of every failure are `RemoteBackend`'s (`stage_protocol.client.remote`, whose
table says what is raised when), into `ReasoningUnavailable`, `ReasoningRejected` and `ReasoningInvalidOutput`; the
errors of our own reasoning server that name their class keep it (`STAGE_SERVER_CODES`). A stream cut before its
finish reason fails after the deltas so far; `timeout_s` bounds one answer in all, the read of each delta by what is
left of it, so a slow trickle ends too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Literal, Unpack

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
    ReasoningDelta,
    ReasoningRequest,
    ReasoningResult,
)
from stage_protocol.backend import FinishReason
from stage_protocol.client import Chunk, ErrorTree
from stage_protocol.client.remote import RemoteBackend, RemoteEndpoint, RemoteOptions, connect
from stage_protocol.loops import LoopWatch
from stage_protocol.model_text import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN


class RemoteReasoningBackend(RemoteBackend[ReasoningError]):
    """The `remote` reasoning backend over a `RemoteEndpoint` (built by `load`)."""

    def __init__(self, endpoint: RemoteEndpoint) -> None:
        super().__init__(endpoint, ERRORS)

    @classmethod
    async def load(cls, *, base_url: str, model: str, **options: Unpack[RemoteOptions]) -> RemoteReasoningBackend:
        """Build the client (`stage_protocol.client.remote.connect`, which takes `options`); nothing is sent (see
        `health`)."""
        return cls(connect("reasoning", base_url=base_url, model=model, **options))

    async def generate(self, request: ReasoningRequest) -> ReasoningResult:
        """`stream` collected. Token counts are 0 when the server sent no usage."""
        collected = Collected()
        async for delta in self.stream(request):
            collected.add(delta)
        return collected.result(self.name, self.model, where=self._where)

    async def stream(self, request: ReasoningRequest) -> AsyncIterator[ReasoningDelta]:
        """Deltas of text or thinking as they arrive; the last one holds the finish reason and token counts."""
        self._check_open()
        deadline = asyncio.get_running_loop().time() + self._endpoint.timeout_s
        progress = self._progress(request.max_new_tokens)
        body = self.dialect.chat_body(
            self.model,
            [_message(message) for message in request.messages],
            max_tokens=request.max_new_tokens,
            temperature=request.temperature,
            sampling=request.sampling.fields(),
        )
        chunks = self._chunks(body)
        watch = LoopWatch()
        with self._translating(progress):
            async with aclosing(chunks), aclosing(self._deltas(chunks)) as deltas:
                while True:
                    async with asyncio.timeout_at(deadline):  # the read only: never around the consumer's time
                        delta = await anext(deltas, None)
                    if delta is None:
                        return
                    progress.add(delta.text + delta.thinking)
                    yield delta
                    if watch.add(delta.text):  # leaving the stream closes it: the server stops generating
                        yield ReasoningDelta(finish_reason="stop")
                        return

    async def _deltas(self, chunks: AsyncIterator[Chunk]) -> AsyncGenerator[ReasoningDelta, None]:
        """The chunks as deltas, ending with the finish reason and usage (the client raises on an empty or cut
        stream, after the deltas already yielded)."""
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
                self._check_finish(chunk.finish_reason, midway=sent)
                finish = "length" if chunk.finish_reason == "length" else "stop"
        text, thinking = splitter.flush()
        if text or thinking:
            yield ReasoningDelta(text=text, thinking=thinking)
        yield ReasoningDelta(finish_reason=finish, prompt_tokens=usage[0], completion_tokens=usage[1])


def _message(message: ChatMessage) -> dict[str, str]:
    return {"role": message.role, "content": message.content}


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


STAGE_SERVER_CODES: dict[str, type[ReasoningError]] = {
    "reasoning_invalid_output": ReasoningInvalidOutput,
    "reasoning_disabled": ReasoningDisabled,
}
"""Error codes of our own reasoning stage server (`reasoning_stage.server`) that keep their error class across the
hop; other codes map by HTTP status."""
ERRORS = ErrorTree[ReasoningError](ReasoningUnavailable, ReasoningRejected, ReasoningInvalidOutput, STAGE_SERVER_CODES)
