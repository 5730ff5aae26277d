"""The `glm` vision backend: GLM-4.6V-Flash in this process, through transformers.

`GlmVisionBackend.load(model)` reads a local directory (or, with `allow_download`, a hub id) with `AutoProcessor` and
`AutoModelForImageTextToText`; the constructor takes an already-built `GlmEngine` (`vision_stage.glm_engine`: a
model plus its processor, and its batching engine if any), which is how the GPU benchmark runs a full-size model
with random weights. torch and transformers are imported inside functions only, so importing this module stays
cheap.

Each request is one greedy generation: the task prompt of `vision_stage.prompts` with the image through the
processor's chat template (`vision_stage.glm_codec`), thinking on or off through the template's `enable_thinking`.
The text is split into thinking and answer, grounding boxes are read out of the answer, and the describe task's JSON
is parsed (`vision_stage.parsing`) and rendered for the reasoning stage (`vision_stage.render`).

Two engines generate (`engine`, `ORCH_VISION__ENGINE`). `batched`, the default: the prompt is encoded in a worker
thread and handed to the batching engine (`batch_engine.engine`), whose own thread decodes many requests together
and reuses an image's prefix KV for a follow-up question on the same image (keyed by the image file's content hash);
requests are not serialised here. `generate`: plain `model.generate` in a worker thread, one request at a time, the
reference the batching engine is tested against. A model loads and warms up with plain `generate` either way.

Foreign errors are translated into the `vision_stage.errors` tree in one place, `vision_stage.glm_errors` (its table
says what each becomes in each phase).
"""

from __future__ import annotations

import asyncio
import functools
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Protocol

from batch_engine.settings import EngineOptions, EngineSettings, engine_settings
from batch_engine.types import Completion, EngineStats
from stage_protocol.loops import LOOP_NOTE
from vision_stage.backend import Health
from vision_stage.errors import VisionError, VisionUnavailable
from vision_stage.facts import image_facts
from vision_stage.glm_codec import EncodedPrompt
from vision_stage.glm_engine import Generation, GlmEngine
from vision_stage.glm_errors import translate_error, translated
from vision_stage.parsing import read_output
from vision_stage.types import ImageFacts, VisionRequest, VisionResult

if TYPE_CHECKING:
    from batch_engine.engine import BatchEngine

DEFAULT_BATCHING = EngineSettings()


class GlmOptions(EngineOptions, Protocol):
    """What `GlmVisionBackend.load_from` reads, named alike by the orchestrator's `glm` settings
    (`ORCH_VISION__…`) and the stage's command line (`python -m vision_stage serve --backend glm`)."""

    @property
    def model(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def thinking(self) -> bool: ...
    @property
    def max_new_tokens(self) -> int: ...
    @property
    def allow_download(self) -> bool: ...


class GlmVisionBackend:
    """GLM-4.6V-Flash in this process: through the engine's batching engine when it has one (requests run
    together), else plain `generate`, one request at a time, each in a worker thread."""

    name = "glm"

    def __init__(
        self, engine: GlmEngine, *, model: str, device: str, thinking: bool = False, max_new_tokens: int = 1024
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        self.model = model
        self.device = device
        self.thinking = thinking
        self.max_new_tokens = max_new_tokens
        self.architecture = engine.architecture
        self._engine: GlmEngine | None = engine
        self._queue = asyncio.Lock()
        """Plain `generate` only: one request at a time."""

    @classmethod
    async def load(
        cls,
        model: str,
        *,
        device: str = "cpu",
        dtype: str = "auto",
        thinking: bool = False,
        max_new_tokens: int = 1024,
        allow_download: bool = False,
        batching: EngineSettings | None = DEFAULT_BATCHING,
    ) -> GlmVisionBackend:
        """Load `model` (a local directory, or a hub id fetched only with `allow_download`) in a worker thread, with
        the batching engine sized by `batching`, or plain `generate` one request at a time when it is None."""
        loaded = await asyncio.to_thread(
            GlmEngine.load, model, device=device, dtype=dtype, local_files_only=not allow_download, batching=batching
        )
        return cls(loaded, model=model, device=device, thinking=thinking, max_new_tokens=max_new_tokens)

    @classmethod
    async def load_from(cls, options: GlmOptions) -> GlmVisionBackend:
        """`load` with the model, device, generation and batching engine that `options` name."""
        return await cls.load(
            options.model,
            device=options.device,
            dtype=options.dtype,
            thinking=options.thinking,
            max_new_tokens=options.max_new_tokens,
            allow_download=options.allow_download,
            batching=engine_settings(options),
        )

    @property
    def engine(self) -> GlmEngine:
        """The loaded model and codec; `VisionUnavailable` once closed."""
        if self._engine is None:
            raise VisionUnavailable(f"the glm vision backend ({self.model}) is closed")
        return self._engine

    async def generate(self, request: VisionRequest) -> VisionResult:
        started = time.perf_counter()
        engine = self.engine
        if engine.batch is not None:
            generation, facts = await self._look_batched(engine, request)
        else:
            async with self._queue:
                engine = self.engine  # closed while this request waited: `VisionUnavailable`
                generation, facts = await asyncio.to_thread(self._look, engine, request)
        reading = read_output(
            request.task,
            generation.text,
            facts,
            who="the glm vision model",
            budget_spent=generation.completion_tokens >= generation.budget,
        )
        tokens = (generation.prompt.prompt_tokens, generation.completion_tokens)
        notes = (*generation.prompt.notes, *((LOOP_NOTE,) if generation.looped else ()))
        return reading.result(self.name, self.model, request.task, started=started, notes=notes, tokens=tokens)

    def _look(self, engine: GlmEngine, request: VisionRequest) -> tuple[Generation, ImageFacts]:
        generation = engine.generate(request, thinking=self.thinking, max_new_tokens=self.max_new_tokens)
        with translated("decode", self.model):  # Pillow, measuring the image's colours
            facts = image_facts(request.image)
        return generation, facts

    async def _look_batched(self, engine: GlmEngine, request: VisionRequest) -> tuple[Generation, ImageFacts]:
        """Encode and submit in a worker thread, wait for the batching engine without holding anything, decode.

        Cancelling the awaiting task does not wait for the engine: a request still queued for a slot is dropped,
        one already running leaves its slot after the engine's next step (`BatchEngine.abandon`). The future is made
        here, before the worker thread encodes, so that a cancellation while the thread still encodes, submits or
        measures the image abandons the request at once: the thread finishes its own work, but a request abandoned
        before the engine admits it is never run."""
        batch = engine.batch
        if batch is None:
            raise VisionUnavailable(f"the glm vision model {engine.name!r} has no batching engine")
        made: Future[Completion] = Future()
        submitting = asyncio.ensure_future(asyncio.to_thread(self._submit, engine, batch, request, made))
        try:
            prompt, budget, future, facts = await asyncio.shield(submitting)
        except asyncio.CancelledError:
            batch.abandon(made)
            submitting.add_done_callback(functools.partial(_abandon_submitted, batch))
            raise
        try:
            completion = await batch.wait(future)  # a cancelled wait abandons the request
        except Exception as exc:
            raise translate_error(exc, phase="generate", model=engine.name) from exc
        generation = await asyncio.to_thread(engine.finish, prompt, budget, completion)
        return generation, facts

    def _submit(
        self, engine: GlmEngine, batch: BatchEngine, request: VisionRequest, made: Future[Completion]
    ) -> tuple[EncodedPrompt, int, Future[Completion], ImageFacts]:
        prompt, budget, future = engine.submit(
            request, thinking=self.thinking, max_new_tokens=self.max_new_tokens, future=made
        )
        try:  # while the engine prefills
            with translated("decode", self.model):  # Pillow, measuring the image's colours
                facts = image_facts(request.image)
        except VisionError:
            batch.abandon(future)  # still queued: never runs; already running: leaves its slot after a step
            raise
        return prompt, budget, future, facts

    def engine_stats(self) -> EngineStats | None:
        """What the batching engine has done (`/metrics` reads it); None without one or once closed."""
        engine = self._engine
        return engine.batch.stats() if engine is not None and engine.batch is not None else None

    async def health(self) -> Health:
        engine = self._engine
        if engine is None:
            return Health(ok=False, detail="closed")
        dtype = str(engine.model.dtype).removeprefix("torch.")
        if engine.batch is None:
            generating = "generate"
        else:
            stats = engine.batch.stats()
            slots = engine.batch.settings.slots
            generating = f"batched, {slots} slots ({stats.running} running, {stats.waiting} waiting)"
        return Health(ok=True, detail=f"{self.model} ({self.architecture}, {dtype}) on {self.device}; {generating}")

    async def aclose(self) -> None:
        async with self._queue:  # let an in-flight plain generation finish first
            engine, self._engine = self._engine, None
        if engine is not None:  # the batching engine fails what it still holds with `VisionUnavailable`
            await asyncio.to_thread(engine.close)


def _abandon_submitted(batch: BatchEngine, done: asyncio.Future[tuple[Any, Any, Future[Completion], Any]]) -> None:
    """Once the worker thread of a cancelled request is done: abandon the future the engine returned (the one made
    for it, unless a wrapped engine made its own), and take the thread's error, if any, so that asyncio does not log
    it as never retrieved: it is no one's to raise."""
    if done.cancelled() or done.exception() is not None:
        return
    batch.abandon(done.result()[2])
