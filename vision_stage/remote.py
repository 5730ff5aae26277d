"""The `remote` vision backend: any OpenAI-compatible `/v1/chat/completions` server taking `image_url` parts (vLLM,
SGLang, a vendor API, our own `vision_stage` server).

One request is one user message: the image as an `image_url` part, then `vision_stage.prompts.task_prompt` as a text
part; greedy decoding (`temperature=0`), `max_tokens=max_new_tokens`, and thinking switched by
`chat_template_kwargs.enable_thinking`, which vLLM and SGLang hand to GLM-4.5V/4.6V's chat template. The image
travels as a `data:` URL: the upload's own bytes when they hold exactly the decoded pixels in PNG or JPEG (no
orientation to apply, no colour conversion: nothing to encode again); otherwise the decoded pixels, as JPEG (quality
90) when the upload was a JPEG, since a PNG of a photo is several times larger, and PNG otherwise, lossless so that
small text stays sharp. With `pass_image_urls`, a client's own http(s) URL is sent as is and the server fetches it.

The answer is streamed (`stream_options.include_usage`) and accumulated. Thinking arrives in the non-standard delta
field `reasoning_content` (vLLM up to 0.11, SGLang) or `reasoning` (newer vLLM), or as a `<think>` block in the
content when the server runs no reasoning parser; it is returned as `thinking`, never as the answer. The `openai`
package parses chunks leniently (servers differ in the fields they send), so their shape is checked here.

Errors are translated in `translate_error` (foreign exceptions) and `_finish_reason` (the stream's own verdict):

| what happened                                                   | raised                                   |
| --------------------------------------------------------------- | ---------------------------------------- |
| connection refused or reset, DNS failure, timeout               | `VisionUnavailable`; `retryable` False   |
|                                                                 | once text of the answer had arrived      |
| HTTP 408, 429 or 5xx                                            | `VisionUnavailable`, `retry_after_s`     |
|                                                                 | from `Retry-After` (seconds or a date)   |
| other HTTP 4xx (bad request, context too long, unknown model)   | `VisionRejected`                         |
| an error event inside the stream                                | by its `code`, as a status; no code:     |
|                                                                 | `VisionUnavailable`                      |
| a 200 not `text/event-stream`, an event not JSON, a chunk       | `VisionInvalidOutput`                    |
| without `choices`, no chunk at all, a stream ending before a    |                                          |
| `finish_reason` (cut mid-answer)                                |                                          |
| `finish_reason` `content_filter`                                | `VisionRejected`                         |
| `finish_reason` `abort` or `error` (the server gave up)         | `VisionUnavailable`                      |
| any other `finish_reason` than `stop` or `length`               | `VisionInvalidOutput`                    |
| nothing after the thinking; a describe answer with no JSON      | `VisionInvalidOutput`                    |
| more than `MAX_CHARS_PER_TOKEN` characters per requested token  | `VisionInvalidOutput`                    |

Timeouts: `connect_timeout_s` to connect; `first_byte_timeout_s` for the longest silence, before the answer begins
and between its parts; `timeout_s` for one answer in all.

Every message names the backend, the server's base URL and the model.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, cast

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

from vision_stage.backend import Health
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
from vision_stage.parsing import read_output, split_thinking
from vision_stage.prompts import task_prompt
from vision_stage.types import DecodedImage, ImageFacts, VisionRequest, VisionResult

if TYPE_CHECKING:
    import httpx2

NO_API_KEY = "EMPTY"
"""Sent when no key is configured: vLLM and SGLang accept any key unless started with one."""
JPEG_QUALITY = 90
HEALTH_TIMEOUT_S = 10.0
RETRYABLE_STATUSES = frozenset({408, 429})
"""With every 5xx: the statuses that mean "not now" rather than "not this request"."""
MAX_CHARS_PER_TOKEN = 32
"""A server that sends more text than this per requested token is not honouring `max_tokens`: cut it off."""


@dataclass(frozen=True)
class _Answer:
    """What a finished stream said: the content, the reasoning deltas, and why it stopped."""

    content: str
    reasoning: str
    finish_reason: str


class RemoteVisionBackend:
    """The `remote` vision backend over an `AsyncOpenAI` client (built by `load`, or injected)."""

    name = "remote"

    def __init__(
        self,
        client: AsyncOpenAI,
        *,
        base_url: str,
        model: str,
        thinking: bool = False,
        max_new_tokens: int = 1024,
        pass_image_urls: bool = False,
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
        self._thinking = thinking
        self._max_new_tokens = max_new_tokens
        self._pass_image_urls = pass_image_urls
        self._owns_client = owns_client
        self._closed = False
        self._where = f"the remote vision backend ({base_url}, model {model!r})"

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
        thinking: bool = False,
        max_new_tokens: int = 1024,
        pass_image_urls: bool = False,
        headers: Callable[[], Mapping[str, str]] | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> RemoteVisionBackend:
        """Build the client; nothing is sent (see `health`). Timeouts as in the module docstring; retries are left
        to the caller (`max_retries=0`).

        `headers` gives extra headers for each request (the orchestrator sends its request id). `http_client` (tests,
        custom transports) is used as is and never closed by `aclose`."""
        if httpx.URL(base_url).scheme not in ("http", "https"):
            raise ValueError(f"the remote vision backend needs an http(s) base URL, got {base_url!r}")
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
            thinking=thinking,
            max_new_tokens=max_new_tokens,
            pass_image_urls=pass_image_urls,
            timeout_s=timeout_s,
            headers=headers,
            owns_client=http_client is None,
        )

    async def generate(self, request: VisionRequest) -> VisionResult:
        started = time.perf_counter()
        if self._closed:
            raise VisionUnavailable(f"{self._where} is closed")
        prompt = self._prompt(request)
        image_url, facts = await asyncio.to_thread(self._prepare, request)
        answer = await self._complete(_messages(image_url, prompt))
        thinking, text = _thinking_and_text(answer)
        if not text:
            spent = f": thinking used all {self._max_new_tokens} tokens" if answer.finish_reason == "length" else ""
            raise VisionInvalidOutput(f"{self._where} gave no answer{spent}")
        reading = read_output(request.task, text, facts, who=self._where)
        if thinking:
            reading = dataclasses.replace(reading, thinking=thinking)
        notes = (f"the answer was cut at {self._max_new_tokens} tokens",) if answer.finish_reason == "length" else ()
        return reading.result(self.name, self.model, request.task, started=started, notes=notes)

    def _prompt(self, request: VisionRequest) -> str:
        try:
            return task_prompt(request.task, request.question)
        except ValueError as exc:
            raise VisionRejected(f"{self._where} cannot run this request: {exc}") from exc

    def _prepare(self, request: VisionRequest) -> tuple[str, ImageFacts]:
        """The image URL to send and the image's facts (CPU work: runs in a worker thread)."""
        url = request.image_url or ""
        passed = self._pass_image_urls and url.startswith(("http://", "https://"))
        return (url if passed else image_data_url(request.image)), image_facts(request.image)

    async def _complete(self, messages: list[ChatCompletionMessageParam]) -> _Answer:
        progress = _Progress(max_chars=MAX_CHARS_PER_TOKEN * self._max_new_tokens)
        try:
            async with asyncio.timeout(self._timeout_s):
                stream = await self._client.chat.completions.create(
                    model=self.model,
                    messages=messages,
                    temperature=0,
                    max_tokens=self._max_new_tokens,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"chat_template_kwargs": {"enable_thinking": self._thinking}},
                    extra_headers=dict(self._headers()) if self._headers else None,
                )
                async with stream:
                    _check_event_stream(stream.response.headers.get("content-type", ""), self._where)
                    return await _collect(stream, self._where, progress)
        except TimeoutError as exc:
            raise VisionUnavailable(
                f"{self._where} did not finish its answer within {self._timeout_s:g} s", retryable=not progress.chars
            ) from exc
        except (OpenAIError, ValueError) as exc:  # ValueError: an event that is not JSON, or not UTF-8
            error = translate_error(exc, self._where)
            if progress.chars and isinstance(error, VisionUnavailable):
                error = VisionUnavailable(f"{error} (after part of the answer had arrived)", retryable=False)
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


def image_data_url(image: DecodedImage) -> str:
    """The image as a `data:` URL: the upload as it is when it can be forwarded (`DecodedImage.source`), else the
    pixels as JPEG (quality `JPEG_QUALITY`) for a JPEG upload and PNG for anything else."""
    if image.source is not None:
        mime = "image/jpeg" if image.format == "JPEG" else "image/png"
        return f"data:{mime};base64,{base64.b64encode(image.source).decode('ascii')}"
    buffer = io.BytesIO()
    if image.format == "JPEG":
        image.pixels.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        mime = "image/jpeg"
    else:
        image.pixels.save(buffer, format="PNG")
        mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def _messages(image_url: str, prompt: str) -> list[ChatCompletionMessageParam]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": prompt}],
        }
    ]


def _thinking_and_text(answer: _Answer) -> tuple[str | None, str]:
    """The thinking (reasoning deltas, then any `<think>` block left in the content) and the answer text."""
    in_content, text = split_thinking(answer.content)
    parts = [part for part in (answer.reasoning.strip(), in_content) if part]
    return ("\n".join(parts) or None), text


def _check_event_stream(content_type: str, where: str) -> None:
    if not content_type.lower().startswith("text/event-stream"):
        shown = content_type or "no content type"
        raise VisionInvalidOutput(f"{where} answered a streaming request with {shown!r}, not text/event-stream")


class _Progress:
    """How much of the answer has arrived; more than `max_chars` is `VisionInvalidOutput`."""

    def __init__(self, max_chars: int) -> None:
        self.chars = 0
        self._max_chars = max_chars

    def add(self, *texts: str, where: str) -> None:
        self.chars += sum(len(text) for text in texts)
        if self.chars > self._max_chars:
            raise VisionInvalidOutput(f"{where} sent more than {self._max_chars} characters: max_tokens ignored?")


async def _collect(stream: AsyncStream[ChatCompletionChunk], where: str, progress: _Progress) -> _Answer:
    """Accumulate a stream; a stream with no chunk, or without a finish reason (cut), is `VisionInvalidOutput`."""
    content: list[str] = []
    reasoning: list[str] = []
    finish: str | None = None
    chunks = 0
    async for chunk in stream:
        chunks += 1
        choice = _first_choice(chunk, where)
        if choice is None:  # the usage chunk
            continue
        content.append(_text(getattr(choice.delta, "content", None)))
        reasoning.append(_reasoning(choice))
        progress.add(content[-1], reasoning[-1], where=where)
        if isinstance(choice.finish_reason, str):
            finish = choice.finish_reason
    if chunks == 0:
        raise VisionInvalidOutput(f"{where} sent an empty stream")
    if finish is None:
        raise VisionInvalidOutput(f"{where} ended the stream without a finish_reason: the answer was cut off")
    return _Answer("".join(content), "".join(reasoning), _finish_reason(finish, where))


def _first_choice(chunk: object, where: str) -> Choice | None:
    choices = getattr(chunk, "choices", None)
    if not isinstance(chunk, ChatCompletionChunk) or not isinstance(choices, list):
        raise VisionInvalidOutput(f"{where} sent a chunk without choices: {_clip(chunk)}")
    if not choices:
        return None
    if not isinstance(choices[0], Choice):
        raise VisionInvalidOutput(f"{where} sent a malformed choice: {_clip(choices[0])}")
    return choices[0]


def _reasoning(choice: Choice) -> str:
    """The delta's thinking: `reasoning_content` (vLLM up to 0.11, SGLang), else `reasoning` (newer vLLM)."""
    return _text(getattr(choice.delta, "reasoning_content", None)) or _text(getattr(choice.delta, "reasoning", None))


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _finish_reason(reason: str, where: str) -> str:
    if reason in ("stop", "length"):
        return reason
    if reason == "content_filter":
        raise VisionRejected(f"{where} refused to answer (finish_reason content_filter)")
    if reason in ("abort", "error"):
        raise VisionUnavailable(f"{where} gave up on the request (finish_reason {reason})")
    raise VisionInvalidOutput(f"{where} stopped for an unexpected reason: finish_reason {reason!r}")


def translate_error(exc: Exception, where: str) -> VisionError:
    """Map an exception of the `openai` client, or the `ValueError` of a stream event that is not JSON (or not
    UTF-8), into the vision error tree."""
    if isinstance(exc, APITimeoutError):
        return VisionUnavailable(f"{where} did not answer in time")
    if isinstance(exc, APIConnectionError):
        cause = exc.__cause__
        reason = f"{type(cause).__name__}: {cause}" if cause else exc.message
        return VisionUnavailable(f"{where} could not be reached ({reason})")
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
    return VisionInvalidOutput(f"{where} sent a malformed stream ({type(exc).__name__}: {exc})")


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


def _stage_error(body: object, where: str) -> VisionError | None:
    code = body.get("code") if isinstance(body, dict) else None
    cls = STAGE_SERVER_CODES.get(code) if isinstance(code, str) else None
    return cls(f"{where}: {_detail(body, code or '')}") if cls is not None else None


def _status_error(
    status: int | None, detail: str, where: str, retry_after: float | None, *, in_stream: bool = False
) -> VisionError:
    what = f"an error event (code {status})" if in_stream else f"HTTP {status}"
    if status is not None and 400 <= status < 500 and status not in RETRYABLE_STATUSES:
        return VisionRejected(f"{where} refused the request with {what}: {detail}")
    return VisionUnavailable(f"{where} answered {what}: {detail}", retry_after_s=retry_after)


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
