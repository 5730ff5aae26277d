"""The `remote` vision backend: any OpenAI-compatible `/v1/chat/completions` server taking `image_url` parts (vLLM,
SGLang, a vendor API, our own `vision_stage` server).

One request is one user message: the image as an `image_url` part, then `vision_stage.prompts.task_prompt` as a text
part; greedy decoding, `max_new_tokens` as the token limit, and thinking switched as the server's dialect does it
(`stage_protocol.client.dialects`: `chat_template_kwargs.enable_thinking` for vLLM and SGLang, `thinking.type` for the
GLM open platform; vLLM and SGLang are also asked to keep GLM's box markers, `skip_special_tokens: false`). The image
travels as a `data:` URL (`vision_stage.image_wire`: the upload's own bytes when they can be forwarded, re-encoded to
fit a server's limits where it has them) or, with `pass_image_urls`, as the client's own http(s) URL, which the
server then fetches.

The answer is streamed and accumulated. Thinking arrives in the non-standard delta field `reasoning_content` (vLLM
up to 0.11, SGLang, the GLM open platform) or `reasoning` (newer vLLM), or as a `<think>` block in the content when
the server runs no reasoning parser; it is returned as `thinking`, never as the answer. What the model wrote is read
liberally (`vision_stage.parsing`): a description in any JSON shape, Markdown or prose is kept, never an error. The
request and the stream go through `stage_protocol.ChatClient`, which checks each chunk's shape.

The client, `health`, `aclose`, the timeouts and the translation of every failure are `RemoteBackend`'s
(`stage_protocol.client.remote`, whose table says what is raised when), into `VisionUnavailable`, `VisionRejected`
and `VisionInvalidOutput`; vLLM's 500 for an image it could not decode is `ImageCorrupt`, and the image errors of our
own vision server keep their class (`STAGE_SERVER_CODES`). No answer at all, or nothing after the thinking, is
`VisionInvalidOutput`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Unpack

from stage_protocol.client import Chunk, ErrorTree
from stage_protocol.client.remote import Progress, RemoteBackend, RemoteEndpoint, RemoteOptions, connect
from stage_protocol.loops import LOOP_NOTE, LoopWatch
from vision_stage.errors import (
    ImageCorrupt,
    ImageEmpty,
    ImageTooLarge,
    ImageTooManyPixels,
    ImageUnsupported,
    VisionError,
    VisionInvalidOutput,
    VisionRejected,
    VisionUnavailable,
)
from vision_stage.facts import image_facts
from vision_stage.image_wire import fitted_data_url
from vision_stage.parsing import read_output, split_thinking
from vision_stage.prompts import task_prompt
from vision_stage.types import ImageFacts, VisionRequest, VisionResult, VisionTask

ALL_REASONING_NOTE = (
    "the server sent the whole answer as reasoning and none as content (a reasoning parser that expected thinking "
    "the model did not do); it is read as the answer"
)
"""With thinking not asked for, an answer that finished normally but came only as reasoning is the answer: vLLM
0.16-0.23's `glm45` parser, for one, reads everything before a `</think>` that never comes as reasoning when the
request does not turn thinking off (the `openai` dialect cannot)."""
PARSE_ON_LOOP_CHARS = 4000
"""Answers longer than this are read in a worker thread: reading a long, broken one can take tens of milliseconds."""
COLOR_TASKS: frozenset[VisionTask] = frozenset({"describe"})
"""The tasks whose facts include the dominant colours (the reasoning route's description, whose colour claims the
arbiter checks). Measuring them means decoding every pixel, which `answer` and `caption` otherwise never need: an
upload that can be forwarded as it is goes to the server undecoded (`DecodedImage.pixels` is lazy)."""


@dataclass(frozen=True)
class _Answer:
    """What a finished stream said: the content, the reasoning deltas, and why it stopped."""

    content: str
    reasoning: str
    finish_reason: str
    tokens: tuple[int, int] = (0, 0)
    """(prompt, completion) tokens from the server's usage, 0 where it sent none."""
    looped: bool = False
    """The answer fell into a loop and was left there (`stage_protocol.loops.LoopWatch`)."""


class RemoteVisionBackend(RemoteBackend[VisionError]):
    """The `remote` vision backend over a `RemoteEndpoint` (built by `load`)."""

    def __init__(
        self,
        endpoint: RemoteEndpoint,
        *,
        thinking: bool = False,
        max_new_tokens: int = 1024,
        pass_image_urls: bool = False,
    ) -> None:
        super().__init__(endpoint, ERRORS)
        self._thinking = thinking
        self._max_new_tokens = max_new_tokens
        self._pass_image_urls = pass_image_urls

    @classmethod
    async def load(
        cls,
        *,
        base_url: str,
        model: str,
        thinking: bool = False,
        max_new_tokens: int = 1024,
        pass_image_urls: bool = False,
        **options: Unpack[RemoteOptions],
    ) -> RemoteVisionBackend:
        """Build the client (`stage_protocol.client.remote.connect`, which takes `options`); nothing is sent (see
        `health`)."""
        endpoint = connect("vision", base_url=base_url, model=model, **options)
        return cls(endpoint, thinking=thinking, max_new_tokens=max_new_tokens, pass_image_urls=pass_image_urls)

    async def generate(self, request: VisionRequest) -> VisionResult:
        started = time.perf_counter()
        self._check_open()
        prompt = self._prompt(request)
        if self._needs_pixels(request):
            image_url, facts, fitted = await asyncio.to_thread(self._prepare, request)
        else:
            image_url, facts, fitted = self._prepare(request)
        answer = await self._complete(self._body(image_url, prompt))
        thinking, text = _thinking_and_text(answer)
        moved = None
        if _all_reasoning(answer) and not self._thinking:
            text, thinking, moved = answer.reasoning.strip(), None, ALL_REASONING_NOTE
        if not text:
            spent = f": thinking used all {self._max_new_tokens} tokens" if answer.finish_reason == "length" else ""
            raise VisionInvalidOutput(f"{self._where} gave no answer{spent}")
        if len(text) > PARSE_ON_LOOP_CHARS:  # a long answer is read off the event loop
            reading = await asyncio.to_thread(read_output, request.task, text, facts, who=self._where)
        else:
            reading = read_output(request.task, text, facts, who=self._where)
        if thinking:
            reading = dataclasses.replace(reading, thinking=thinking)
        cut = f"the answer was cut at {self._max_new_tokens} tokens" if answer.finish_reason == "length" else None
        looped = LOOP_NOTE if answer.looped else None
        notes = tuple(note for note in (fitted, moved, cut, looped) if note)
        return reading.result(self.name, self.model, request.task, started=started, notes=notes, tokens=answer.tokens)

    def _prompt(self, request: VisionRequest) -> str:
        try:
            return task_prompt(request.task, request.question)
        except ValueError as exc:
            raise VisionRejected(f"{self._where} cannot run this request: {exc}") from exc

    def _passes_url(self, request: VisionRequest) -> bool:
        return self._pass_image_urls and (request.image_url or "").startswith(("http://", "https://"))

    def _needs_pixels(self, request: VisionRequest) -> bool:
        """Whether `_prepare` decodes pixels (CPU work for a worker thread): for the colours, or to encode them."""
        image = request.image
        if image.pixels_decoded:
            return False
        if self._passes_url(request):
            return request.task in COLOR_TASKS
        limits = self.dialect.image_limits
        oversized = limits is not None and not limits.take(image.width, image.height, image.byte_size)
        return request.task in COLOR_TASKS or image.source is None or oversized

    def _prepare(self, request: VisionRequest) -> tuple[str, ImageFacts, str | None]:
        """The image URL to send, the image's facts, and a note when the image was changed to fit the server."""
        facts = image_facts(request.image, colors=request.task in COLOR_TASKS)
        if self._passes_url(request) and request.image_url:
            return request.image_url, facts, None
        url, note = fitted_data_url(request.image, self.dialect.image_limits)
        return url, facts, note

    def _body(self, image_url: str, prompt: str) -> dict[str, object]:
        content = [
            {"type": "image_url", "image_url": {"url": self.dialect.image_url(image_url)}},
            {"type": "text", "text": prompt},
        ]
        return self.dialect.chat_body(
            self.model,
            [{"role": "user", "content": content}],
            max_tokens=self._max_new_tokens,
            temperature=0.0,
            thinking=self._thinking,
            keep_markup=True,
        )

    async def _complete(self, body: dict[str, object]) -> _Answer:
        progress = self._progress(self._max_new_tokens)
        with self._translating(progress):
            async with asyncio.timeout(self._endpoint.timeout_s), aclosing(self._chunks(body)) as chunks:
                return await self._collect(chunks, progress)

    async def _collect(self, chunks: AsyncIterator[Chunk], progress: Progress) -> _Answer:
        """Accumulate the chunks (the client raises on an empty or cut stream)."""
        content: list[str] = []
        reasoning: list[str] = []
        finish = "stop"
        tokens = (0, 0)
        watch = LoopWatch()
        async for chunk in chunks:
            if chunk.usage is not None:
                tokens = (chunk.usage[0] or 0, chunk.usage[1] or 0)
            if not chunk.choice:  # the usage chunk
                continue
            content.append(chunk.content)
            reasoning.append(chunk.reasoning)
            progress.add(chunk.content, chunk.reasoning)
            if chunk.finish_reason is not None:
                finish = chunk.finish_reason
            if watch.add(chunk.content + chunk.reasoning):  # the caller closes the stream: the server stops
                return _Answer("".join(content), "".join(reasoning), "stop", tokens, looped=True)
        text = "".join(content)
        self._check_finish(finish, midway=bool(text))
        return _Answer(text, "".join(reasoning), finish, tokens)


def _all_reasoning(answer: _Answer) -> bool:
    """Whether a normally finished answer came only in the reasoning field: no content at all, not even a `<think>`
    block (thinking the model itself marked stays thinking)."""
    return answer.finish_reason == "stop" and not answer.content.strip() and bool(answer.reasoning.strip())


def _thinking_and_text(answer: _Answer) -> tuple[str | None, str]:
    """The thinking (reasoning deltas, then any `<think>` block left in the content) and the answer text."""
    in_content, text = split_thinking(answer.content)
    parts = [part for part in (answer.reasoning.strip(), in_content) if part]
    return ("\n".join(parts) or None), text


STAGE_SERVER_CODES: dict[str, type[VisionError]] = {
    "vision_invalid_output": VisionInvalidOutput,
    "image_empty": ImageEmpty,
    "image_too_large": ImageTooLarge,
    "image_too_many_pixels": ImageTooManyPixels,
    "image_unsupported": ImageUnsupported,
    "image_corrupt": ImageCorrupt,
}
"""Error codes of our own vision stage server (`vision_stage.server`) that keep their error class across the hop;
other codes map by HTTP status."""
ERRORS = ErrorTree[VisionError](
    VisionUnavailable, VisionRejected, VisionInvalidOutput, STAGE_SERVER_CODES, image=ImageCorrupt
)
