"""The `local` backend: a transformers causal LM with a chat template, running in this process.

`model=None` loads the embedded SmolLM2-135M-Instruct (see `reasoning_stage.embedded`); any other value is a local
directory or a hub id, loaded through the same code path with no special case by model name. torch and transformers
are imported inside functions only, so importing this module stays cheap.

The model itself, and the translation of foreign errors into the `reasoning_stage.errors` tree, are in
`reasoning_stage.chat_model`. With a batching engine (`batching` settings; `reasoning_stage.batched`), greedy
requests run on it, together, and only sampled ones (`temperature > 0`) take the path below, one at a time.

`generate` and `stream` share one path: the model generates in a worker thread with a `TokenFeed` as its
transformers streamer, which hands each new token to the event loop (when streaming) and checks, at every decoding
step, whether the caller has gone. Generation ends at the budget, at an end token, or, once the caller stops listening
(the stream is closed, the awaiting task is cancelled, the server's client disconnects), within one decoding step: the
feed raises inside `model.generate`, the thread unwinds, and only then is the model released to the next request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from batch_engine.attention_plans import plan_by_power_of_two
from batch_engine.compiling import use_dynamo_settings
from batch_engine.engine import BatchEngine
from batch_engine.settings import EngineOptions, EngineSettings, engine_settings
from batch_engine.types import EngineStats
from reasoning_stage import batched
from reasoning_stage.backend import Health
from reasoning_stage.chat_model import ChatModel, Completion, translated
from reasoning_stage.embedded import CONVERSION_HINT, EMBEDDED_MODEL, ensure_converted
from reasoning_stage.errors import (
    ReasoningRejected,
    ReasoningUnavailable,
)
from reasoning_stage.token_stream import IncrementalText, TokenFeed, deliver_to
from reasoning_stage.types import ReasoningDelta, ReasoningRequest, ReasoningResult
from stage_protocol.backend import FinishReason

log = logging.getLogger(__name__)


class LocalOptions(EngineOptions, Protocol):
    """What `LocalReasoningBackend.load_from` reads, named alike by the orchestrator's `local` settings
    (`ORCH_REASONING__…`) and the stage's command line (`python -m reasoning_stage serve`)."""

    @property
    def model(self) -> str | None: ...
    @property
    def device(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def cache_dir(self) -> Path | None: ...
    @property
    def allow_download(self) -> bool: ...


@dataclass(frozen=True)
class _Source:
    """Where a model's weights are read from, as resolved before loading."""

    model: str
    location: str
    local_only: bool
    converted: bool = False


def _resolve(model: str | None, *, cache_dir: Path | None, allow_download: bool) -> _Source:
    if model is None:
        with translated("load", EMBEDDED_MODEL, hint=CONVERSION_HINT):
            path, converted = ensure_converted(cache_dir)
        return _Source(EMBEDDED_MODEL, str(path), local_only=True, converted=converted)
    expanded = Path(model).expanduser()
    location = str(expanded) if expanded.is_dir() else model
    return _Source(model, location, local_only=not allow_download)


def _check_request(request: ReasoningRequest) -> None:
    if not request.messages:
        raise ReasoningRejected("the reasoning request holds no messages")
    if request.max_new_tokens < 1:
        raise ReasoningRejected(f"max_new_tokens must be at least 1, not {request.max_new_tokens}")
    if not math.isfinite(request.temperature) or request.temperature < 0:
        raise ReasoningRejected(f"temperature must be a finite number ≥ 0, not {request.temperature}")


class LocalReasoningBackend:
    """A chat model loaded in this process; one generation at a time, each in a worker thread."""

    name = "local"

    def __init__(
        self,
        chat: ChatModel,
        *,
        model: str,
        source: str,
        device: str,
        converted: bool = False,
        load_seconds: float = 0.0,
        engine: BatchEngine | None = None,
    ) -> None:
        self.model = model
        self.source = source
        """The directory or hub id the weights were read from (for the embedded model: the converted cache copy)."""
        self.device = device
        self.architecture = chat.architecture
        """The transformers class that runs, e.g. `LlamaForCausalLM` or `Glm4ForCausalLM`."""
        self.converted = converted
        """Whether this load converted the embedded GGUF (first run) rather than reading an existing copy."""
        self.load_seconds = load_seconds
        """Wall time of `load`, conversion included."""
        self._chat: ChatModel | None = chat
        self._lock = asyncio.Lock()
        """Plain `generate`: one generation at a time."""
        self.engine = engine
        """The batching engine greedy requests run on, if any."""

    @classmethod
    async def load(
        cls,
        model: str | None,
        *,
        device: str = "cpu",
        dtype: str = "auto",
        cache_dir: Path | None = None,
        allow_download: bool = False,
        batching: EngineSettings | None = None,
    ) -> LocalReasoningBackend:
        """Load `model` (a local directory or hub id; None for the embedded SmolLM2) in a worker thread.

        `cache_dir` is where the converted embedded model is kept (default: the user cache directory); hub ids use
        the hub's own cache and are fetched only when `allow_download` is set. `batching`: start a batching engine
        over the model for greedy requests (None: plain `generate` for all).
        """
        started = time.perf_counter()
        if batching is not None and batching.attention_plans == "power-of-two":
            plan_by_power_of_two()  # before the model's first attention: PyTorch reads it once
        log.info("local backend: locating %s ...", model or "the embedded SmolLM2-135M-Instruct")
        src = await asyncio.to_thread(_resolve, model, cache_dir=cache_dir, allow_download=allow_download)
        log.info("local backend: loading the tokenizer and weights of %s onto %s ...", src.model, device)
        chat = await asyncio.to_thread(
            ChatModel.load, src.location, device=device, dtype=dtype, local_files_only=src.local_only
        )
        engine = None
        if batching is not None:
            log.info("local backend: starting the batching engine (%d slots) ...", batching.slots)
            engine = await asyncio.to_thread(batched.start_engine, chat, batching, src.model)
        log.info("local backend: %s ready in %.2f s", src.model, time.perf_counter() - started)
        return cls(
            chat,
            model=src.model,
            source=src.location,
            device=device,
            converted=src.converted,
            load_seconds=time.perf_counter() - started,
            engine=engine,
        )

    @classmethod
    async def load_from(cls, options: LocalOptions) -> LocalReasoningBackend:
        """`load` with the model, device and batching engine that `options` name."""
        return await cls.load(
            options.model,
            device=options.device,
            dtype=options.dtype,
            cache_dir=options.cache_dir,
            allow_download=options.allow_download,
            batching=engine_settings(options),
        )

    @property
    def context_tokens(self) -> int | None:
        """The longest prompt plus completion the model holds, when known."""
        return self._chat.context_tokens if self._chat is not None else None

    async def generate(self, request: ReasoningRequest) -> ReasoningResult:
        started = time.perf_counter()
        async with self._running(request, None) as (chat, worker):
            completion = await asyncio.shield(worker)  # a cancelled caller stops the thread in `_generating`
        return ReasoningResult(
            backend=self.name,
            model=self.model,
            text=completion.text,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=len(completion.token_ids),
            finish_reason=_finish_reason(completion, chat.stop_ids),
            latency_ms=(time.perf_counter() - started) * 1000,
        )

    async def stream(self, request: ReasoningRequest) -> AsyncGenerator[ReasoningDelta, None]:
        """The answer as it is generated: text deltas that concatenate to what `generate` returns, then a last delta
        with the finish reason and token counts. Errors before the first token raise from the first `__anext__`.

        The model is held until the stream is exhausted or closed; closing it (or cancelling its consumer) stops the
        generation within one decoding step."""
        pieces: asyncio.Queue[list[int] | None] = asyncio.Queue()
        async with self._running(request, pieces) as (chat, worker):
            text = IncrementalText(chat.decode)
            while (ids := await pieces.get()) is not None:
                if piece := text.add(ids):
                    yield ReasoningDelta(text=piece)
            completion = await asyncio.shield(worker)
        yield ReasoningDelta(
            text=text.finish(completion.text),
            finish_reason=_finish_reason(completion, chat.stop_ids),
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=len(completion.token_ids),
        )

    @asynccontextmanager
    async def _running(
        self, request: ReasoningRequest, pieces: asyncio.Queue[list[int] | None] | None
    ) -> AsyncIterator[tuple[ChatModel, asyncio.Task[Completion]]]:
        """`request` running in a task, feeding new token ids into `pieces` (then None): on the batching engine when
        there is one and the request is greedy, else through plain `generate` (`_generating`). On leaving, the task
        is stopped (cancelled: the engine drops the request) and awaited."""
        engine = self.engine
        if engine is None or request.temperature > 0:
            async with self._generating(request, pieces) as running:
                yield running
            return
        _check_request(request)
        chat = self._chat
        if chat is None:
            raise ReasoningUnavailable(f"the reasoning model {self.model!r} has been closed")
        worker = asyncio.create_task(batched.complete(engine, chat, request, model=self.model, pieces=pieces))
        try:
            yield chat, worker
        finally:
            worker.cancel()  # nothing when it is done
            await _settle(worker)

    @asynccontextmanager
    async def _generating(
        self, request: ReasoningRequest, pieces: asyncio.Queue[list[int] | None] | None
    ) -> AsyncIterator[tuple[ChatModel, asyncio.Task[Completion]]]:
        """Hold the model and run `request` in a worker thread, feeding new token ids into `pieces` (then None).

        On leaving (done, failed, closed or cancelled) the generation is told to stop and awaited: the thread ends
        within one decoding step, and the model is released only after it has."""
        _check_request(request)
        async with self._lock:
            chat = self._chat
            if chat is None:
                raise ReasoningUnavailable(f"the reasoning model {self.model!r} has been closed")
            feed = TokenFeed(deliver_to(pieces) if pieces is not None else None)
            worker = asyncio.create_task(self._work(chat, request, feed, pieces))
            try:
                yield chat, worker
            finally:
                feed.stop.set()
                await _settle(worker)

    async def _work(
        self,
        chat: ChatModel,
        request: ReasoningRequest,
        feed: TokenFeed,
        pieces: asyncio.Queue[list[int] | None] | None,
    ) -> Completion:
        try:
            return await asyncio.to_thread(self._complete, chat, request, feed)
        finally:
            if pieces is not None:  # after every token: the thread scheduled those before it returned
                pieces.put_nowait(None)

    def _complete(self, chat: ChatModel, request: ReasoningRequest, feed: TokenFeed) -> Completion:
        if self.engine is not None and self.engine.device.compiled:
            use_dynamo_settings()  # plain `generate` on the engine's compiled layers, in this worker's own context
        with translated("generate", self.model):
            prompt_ids, budget = chat.encode_within_context(request.messages, request.max_new_tokens, model=self.model)
            ids = chat.complete(prompt_ids, max_new_tokens=budget, temperature=request.temperature, feed=feed)
            return Completion(len(prompt_ids), ids, budget, chat.decode(ids).strip())

    def engine_stats(self) -> EngineStats | None:
        """What the batching engine has done (`/metrics` reads it); None without one or once closed."""
        return self.engine.stats() if self.engine is not None else None

    async def health(self) -> Health:
        if self._chat is None:
            return Health(ok=False, detail=f"{self.model} has been closed")
        engine = ", batching engine" if self.engine is not None else ""
        return Health(ok=True, detail=f"{self.model} ({self.architecture}) on {self.device}{engine}")

    async def aclose(self) -> None:
        async with self._lock:  # let an in-flight generation finish first
            self._chat = None
        if self.engine is not None:  # what it still runs fails as unavailable
            engine, self.engine = self.engine, None
            await asyncio.to_thread(engine.close)


async def _settle(worker: asyncio.Task[Completion]) -> None:
    """Wait until `worker` has ended, even when the waiting is cancelled meanwhile (a closed stream whose closer is
    itself cancelled): the model lock must not be released while the generation thread still runs. Its exception is
    retrieved (nobody awaits a closed stream's worker), and a cancellation that came meanwhile is raised after."""
    cancelled = False
    while not worker.done():
        try:
            await asyncio.wait([worker])
        except asyncio.CancelledError:
            cancelled = True
    if not worker.cancelled():
        worker.exception()
    if cancelled:
        raise asyncio.CancelledError


def _finish_reason(completion: Completion, stop_ids: frozenset[int]) -> FinishReason:
    ids = completion.token_ids
    if ids and ids[-1] in stop_ids:
        return "stop"
    return "length" if len(ids) >= completion.budget else "stop"
