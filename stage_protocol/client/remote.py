"""What both `remote` stage backends share: the server they call (`connect`, `RemoteEndpoint`) and their base,
`RemoteBackend`: the `ChatClient`'s lifecycle, `health`, `aclose`, and the one translation of every failure into the
stage's own error tree (an `ErrorTree`, as `stage_protocol.client.failures` classifies what went wrong).

Each stage's backend (`vision_stage.remote`, `reasoning_stage.remote`) builds its own request body and reads its own
answer. What goes wrong becomes the stage's error of that kind:

| what happened                                                   | raised                                   |
| --------------------------------------------------------------- | ---------------------------------------- |
| connection refused or reset, DNS failure, timeout               | unavailable; `retryable` False once part |
|                                                                 | of the answer had arrived                |
| HTTP 408, 429 or 5xx                                            | unavailable, `retry_after_s` from        |
|                                                                 | `Retry-After` (seconds or a date)        |
| an exhausted account balance (the GLM open platform's 1113)     | unavailable, not retryable               |
| vLLM's 500 for an image it could not decode                     | the stage's image error, else rejected   |
| other HTTP 4xx (bad request, context too long, unknown model,   | rejected                                 |
| a vendor's safety refusal)                                      |                                          |
| an error event inside the stream                                | by its `code`, as a status (100–599) or  |
|                                                                 | a vendor code; else unavailable          |
| an error code of our own stage server (`ErrorTree.by_code`)     | the same class as on the server          |
| a 200 not `text/event-stream`, an event not JSON, a chunk       | invalid output                           |
| without `choices`, no chunk at all, a stream ending before a    |                                          |
| `finish_reason` (cut mid-answer)                                |                                          |
| `finish_reason` `content_filter` or `sensitive`                 | rejected                                 |
| `finish_reason` `abort`, `error` or `network_error`             | unavailable                              |
| any other `finish_reason` than `stop` or `length`               | invalid output                           |
| more than `MAX_CHARS_PER_TOKEN` characters per requested token  | invalid output                           |

Timeouts: `connect_timeout_s` to connect; `first_byte_timeout_s` for the longest silence, before the answer begins
and between its parts; `timeout_s` for one answer in all (unavailable when it passes; `retryable` False once part of
the answer had arrived).

Every message names the backend, the server's base URL and the model.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypedDict, TypeVar

import httpx

from stage_protocol.backend import Health
from stage_protocol.client.chat import ChatClient, Chunk, without_credentials
from stage_protocol.client.dialects import Dialect, DialectName, dialect
from stage_protocol.client.errors import StageHttpError
from stage_protocol.client.failures import ErrorTree, classify, finish_failure
from stage_protocol.client.transport import TransportName

E = TypeVar("E", bound=Exception)
HEALTH_TIMEOUT_S = 10.0
MAX_CHARS_PER_TOKEN = 32
"""A server that sends more text than this per requested token is not honouring `max_tokens`: cut it off."""


class RemoteOptions(TypedDict, total=False):
    """What every `remote` backend's `load` takes besides `base_url` and `model`, as `connect` takes it."""

    api_key: str | None
    timeout_s: float
    connect_timeout_s: float
    first_byte_timeout_s: float
    headers: Callable[[], Mapping[str, str]] | None
    http_client: httpx.AsyncClient | None
    dialect_name: DialectName
    transport: TransportName


@dataclass(frozen=True)
class RemoteEndpoint:
    """The server a `remote` backend of `stage` (`vision`) calls: its client, base URL (without any credentials it
    held: messages, logs and health show it), model and dialect, how long one answer may take in all, and the extra
    headers of each request."""

    stage: str
    client: ChatClient
    base_url: str
    model: str
    dialect: Dialect
    timeout_s: float = 120.0
    headers: Callable[[], Mapping[str, str]] | None = None

    @property
    def where(self) -> str:
        """How messages name the backend: `the remote vision backend (http://…/v1, model 'm')`."""
        return f"the remote {self.stage} backend ({self.base_url}, model {self.model!r})"


def connect(
    stage: str,
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
    transport: TransportName = "auto",
) -> RemoteEndpoint:
    """The endpoint of a `remote` backend of `stage`, its client built; nothing is sent (see `RemoteBackend.health`).
    Timeouts as in the module docstring; retries are left to the caller.

    `headers` gives extra headers for each request (the orchestrator sends its request id). `transport` names the
    HTTP client (`ChatClient`); `http_client` (tests, custom transports) is used as is and never closed by `aclose`."""
    if httpx.URL(base_url).scheme not in ("http", "https"):
        raise ValueError(f"the remote {stage} backend needs an http(s) base URL, got {base_url!r}")
    client = ChatClient(
        base_url,
        api_key=api_key,
        connect_timeout_s=connect_timeout_s,
        first_byte_timeout_s=first_byte_timeout_s,
        http_client=http_client,
        transport=transport,
    )
    shown = without_credentials(base_url)
    return RemoteEndpoint(stage, client, shown, model, dialect(dialect_name), timeout_s, headers)


class Progress:
    """How much of the answer has arrived; more than `max_chars` is `invalid` (the stage's invalid output)."""

    def __init__(self, max_chars: int, where: str, invalid: Callable[[str], Exception]) -> None:
        self.chars = 0
        self._max_chars = max_chars
        self._where = where
        self._invalid = invalid

    def add(self, *texts: str) -> None:
        self.chars += sum(len(text) for text in texts)
        if self.chars > self._max_chars:
            raise self._invalid(f"{self._where} sent more than {self._max_chars} characters: max_tokens ignored?")


class RemoteBackend(Generic[E]):
    """The base of a `remote` stage backend calling `endpoint`, whose failures become errors of `errors` (module
    docstring). A subclass builds its request body, sends it with `_chunks` inside `_translating`, and reads the
    chunks, checking the finish reason with `_check_finish`."""

    name = "remote"

    def __init__(self, endpoint: RemoteEndpoint, errors: ErrorTree[E]) -> None:
        self.model = endpoint.model
        self.base_url = endpoint.base_url
        self.dialect = endpoint.dialect
        self._endpoint = endpoint
        self._errors = errors
        self._where = endpoint.where
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise self._errors.unavailable(f"{self._where} is closed")

    def _progress(self, max_tokens: int) -> Progress:
        return Progress(MAX_CHARS_PER_TOKEN * max_tokens, self._where, self._errors.invalid)

    def _chunks(self, body: Mapping[str, object]) -> AsyncGenerator[Chunk, None]:
        """The answer's chunks (`ChatClient.chunks`), with the extra headers of this request."""
        headers = self._endpoint.headers() if self._endpoint.headers else None
        return self._endpoint.client.chunks(body, headers)

    @contextmanager
    def _translating(self, progress: Progress) -> Iterator[None]:
        """The client's failures, and the end of the answer's time (a `TimeoutError`), as the stage's errors."""
        try:
            yield
        except TimeoutError as exc:
            message = f"{self._where} did not finish its answer within {self._endpoint.timeout_s:g} s"
            raise self._errors.unavailable(message, retryable=not progress.chars) from exc
        except StageHttpError as exc:
            raise self.translate_error(exc, midway=progress.chars > 0) from exc

    def _check_finish(self, reason: str, *, midway: bool) -> None:
        """Raise the stage's error for a `finish_reason` that is no answer (`finish_failure`)."""
        failure = finish_failure(reason)
        if failure is not None:
            raise self._errors.error(failure, self._where, midway=midway)

    def translate_error(self, exc: StageHttpError, *, midway: bool = False) -> E:
        """`exc` as the stage's error (`stage_protocol.client.classify` says what it means, read in this server's
        dialect). `midway`: part of the answer had arrived."""
        failure = classify(exc, stream_codes=self.dialect.stream_error_codes)
        return self._errors.error(failure, self._where, midway=midway)

    async def health(self) -> Health:
        """`GET {base_url}/models`: ok when the server answers and serves the model. Never raises."""
        if self._closed:
            return Health(ok=False, detail="closed")
        try:
            served = await self._endpoint.client.model_ids(HEALTH_TIMEOUT_S)
        except Exception as exc:  # health reports every failure, whatever raised it
            error = self.translate_error(exc) if isinstance(exc, StageHttpError) else exc
            return Health(ok=False, detail=f"{type(error).__name__}: {error}")
        if self.model not in served:
            return Health(ok=False, detail=f"{self._where} is up but serves only: {', '.join(served) or 'nothing'}")
        return Health(ok=True, detail=f"{self.base_url} serves {self.model!r}")

    async def aclose(self) -> None:
        """Close the client (its HTTP client too, unless that was injected)."""
        self._closed = True
        await self._endpoint.client.aclose()
