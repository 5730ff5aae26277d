"""The `glm` vision backend: GLM-4.6V-Flash in this process, through transformers.

`GlmVisionBackend.load(model)` reads a local directory (or, with `allow_download`, a hub id) with `AutoProcessor` and
`AutoModelForImageTextToText`; the constructor takes an already-built `GlmEngine` (a model plus its processor, and
its batching engine if any), which is how the GPU benchmark runs a full-size model with random weights. torch and
transformers are imported inside functions only, so importing this module stays cheap.

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
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image

from batch_engine.attention_plans import plan_by_power_of_two
from batch_engine.settings import EngineOptions, EngineSettings, engine_settings
from batch_engine.start import agrees, started
from batch_engine.types import Completion, EngineStats, Refusals
from stage_protocol.dtypes import named_dtype
from stage_protocol.generation import generation_config
from stage_protocol.loops import LOOP_NOTE, WINDOW, loop_stopper, repeats_at_end
from vision_stage.backend import Health
from vision_stage.errors import VisionError, VisionRejected, VisionUnavailable
from vision_stage.facts import image_facts
from vision_stage.glm_codec import MAX_VISUAL_TOKENS, EncodedPrompt, GlmCodec, Processor, image_device
from vision_stage.glm_errors import translate_error, translated
from vision_stage.parsing import read_output
from vision_stage.types import DecodedImage, ImageFacts, VisionRequest, VisionResult

if TYPE_CHECKING:
    import torch
    from transformers import GenerationConfig, PreTrainedConfig
    from transformers.generation.utils import GenerateOutput

    from batch_engine.engine import BatchEngine

DEFAULT_BATCHING = EngineSettings()
REFUSALS = Refusals(VisionRejected, VisionUnavailable, "ORCH_VISION__ENGINE")
"""What the batching engine refuses, as the vision stage's errors."""


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


class ImageTextModel(Protocol):
    """The part of a transformers `Glm4vForConditionalGeneration` used here, typed more tightly than its stubs."""

    config: PreTrainedConfig
    generation_config: GenerationConfig
    device: torch.device
    dtype: torch.dtype

    def generate(self, **kwargs: Any) -> torch.Tensor | GenerateOutput: ...


@dataclass(frozen=True)
class Generation:
    """One generation: the decoded text (thinking and box markup kept) and token counts."""

    text: str
    prompt: EncodedPrompt
    completion_tokens: int
    budget: int
    looped: bool = False
    """The generation was stopped at a loop (`stage_protocol.loops.loop_stopper`)."""


class GlmEngine:
    """A GLM-4.6V model and its codec behind blocking methods (run them in a worker thread). `generate` is plain
    `model.generate`, one generation at a time; with a `batch` engine, `submit` hands prompts to it instead."""

    def __init__(
        self, model: ImageTextModel, codec: GlmCodec, *, name: str | None = None, batch: BatchEngine | None = None
    ) -> None:
        self.model = model
        self.codec = codec
        self.batch = batch
        """The batching engine over `model`, started; None: plain `generate` only."""
        self.architecture = type(model).__name__
        self.name = name or self.architecture
        """What error messages call the model: the directory or hub id it was loaded from."""
        text_config = model.config.get_text_config()
        limit = getattr(text_config, "max_position_embeddings", None)
        self.context_tokens: int | None = limit if isinstance(limit, int) and limit > 0 else None
        self._busy = threading.Lock()

    @classmethod
    def load(
        cls, source: str, *, device: str, dtype: str, local_files_only: bool, batching: EngineSettings | None = None
    ) -> GlmEngine:
        """`from_pretrained` the processor and model from `source` (a directory, or a hub id) onto `device`, then
        warm up with plain `generate` (blocking); with `batching`, then build the batching engine over the model and
        start it (on a GPU it captures its CUDA graphs first). Any failure is `VisionUnavailable`, naming `source` and
        what to do."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if batching is not None and batching.attention_plans == "power-of-two":
            plan_by_power_of_two()  # before the warm-up's attention: PyTorch reads it once
        expanded = Path(source).expanduser()
        source = str(expanded) if expanded.is_dir() else source
        with translated("load", source):
            load_processor: Callable[..., Processor] = AutoProcessor.from_pretrained  # unannotated in transformers
            processor = load_processor(source, local_files_only=local_files_only)
            if not getattr(processor, "chat_template", None) or not hasattr(processor, "image_processor"):
                raise VisionUnavailable(
                    f"the glm vision model {source!r} has no multimodal processor with a chat template; point it at "
                    "a GLM-4.6V-Flash checkpoint directory"
                )
            model: Any = AutoModelForImageTextToText.from_pretrained(
                source, dtype=torch_dtype(dtype, device), device_map=device, local_files_only=local_files_only
            )
            placed = image_device(processor, model.device)
            codec = GlmCodec(
                processor,
                max_visual_tokens=MAX_VISUAL_TOKENS,
                image_device=placed,
                image_dtype=model.dtype if placed is not None else None,
            )
            engine = cls(model.eval(), codec, name=source)
            engine.warm_up()
        if batching is not None:
            engine.batch = started(
                model, batching, REFUSALS, model_name=f"the glm vision model {source!r}", fails=VisionUnavailable
            )
            engine.check_batching()
        return engine

    def warm_up(self) -> None:
        """Encode a small image and generate one token, so a broken checkpoint fails now and not on a request."""
        self.generate(warm_up_request(), thinking=False, max_new_tokens=1)

    def check_batching(self, tokens: int = 8) -> bool:
        """Whether the batching engine's first `tokens` tokens for the warm-up image equal plain `generate`'s (which
        also runs the engine's prefill of an image once before any request; `batch_engine.start.agrees`). Plain
        `generate` runs the model eagerly here (uncompiled): with the engine, nothing else calls it, so
        compiling the layers for its cache and sizes would only lengthen the start and count against dynamo's
        recompile limit."""
        import torch

        if self.batch is None:
            return True
        with translated("load", self.name):
            prompt = self.codec.encode(warm_up_request(), thinking=False)
            with torch.compiler.set_stance("force_eager"):
                expected = self.generate_ids(prompt, tokens)
            return agrees(self.batch, prompt.inputs, expected, what="the warm-up image")

    def generate(self, request: VisionRequest, *, thinking: bool, max_new_tokens: int) -> Generation:
        """Greedy generation for `request`; raises only `VisionError`s."""
        model_name = self.name
        with self._busy:
            with translated("encode", model_name):
                prompt = self.codec.encode(request, thinking=thinking)
            budget = self._budget(prompt, max_new_tokens)
            with translated("generate", model_name):
                ids = self.generate_ids(prompt, budget)
            with translated("decode", model_name):
                text = self.codec.decode(ids)
        return Generation(text, prompt, len(ids), budget, looped=repeats_at_end(ids[-WINDOW:]))

    def submit(
        self,
        request: VisionRequest,
        *,
        thinking: bool,
        max_new_tokens: int,
        future: Future[Completion] | None = None,
    ) -> tuple[EncodedPrompt, int, Future[Completion]]:
        """Encode `request` and queue it on the batching engine (blocking: the processor and the M-RoPE positions
        are CPU work): the prompt, its token budget and the engine's future (`future` where given: see
        `BatchEngine.submit`). Raises only `VisionError`s; the future may fail with anything (translate it with
        `translate_error`, phase `generate`)."""
        batch = self.batch
        if batch is None:
            raise VisionUnavailable(f"the glm vision model {self.name!r} has no batching engine")
        with translated("encode", self.name):
            prompt = self.codec.encode(request, thinking=thinking)
        # The slot's room bounds the answer too: counted in the budget, an answer cut there is seen as cut.
        room = max(1, batch.settings.max_tokens - prompt.prompt_tokens)  # none at all: `submit` rejects it
        budget = min(self._budget(prompt, max_new_tokens), room)
        image_key = request.image.sha256 or None  # the image file's content hash, never a perceptual key
        with translated("generate", self.name):
            future = batch.submit(prompt.inputs, image_key=image_key, max_new_tokens=budget, future=future)
        return prompt, budget, future

    def finish(self, prompt: EncodedPrompt, budget: int, completion: Completion) -> Generation:
        """The `Generation` of what the batching engine answered to `submit` (blocking: decoding is CPU work); raises
        only `VisionError`s."""
        with translated("decode", self.name):
            text = self.codec.decode(completion.ids)
        return Generation(text, prompt, len(completion.ids), budget, looped=completion.looped)

    def close(self) -> None:
        """Stop the batching engine, if any (blocking: it joins the engine's thread); what it still holds fails with
        `VisionUnavailable`. The model itself stays loaded."""
        if self.batch is not None:
            self.batch.close()

    def generate_ids(self, prompt: EncodedPrompt, max_new_tokens: int) -> list[int]:
        """The new token ids of one greedy generation (blocking; foreign errors are not translated here), stopped
        early once it loops (`stage_protocol.loops.loop_stopper`: GLM-4.6V can overthink and repeat)."""
        import torch
        from transformers import StoppingCriteriaList

        inputs = {name: tensor.to(self.model.device) for name, tensor in prompt.inputs.items()}
        config = generation_config(self.model.generation_config, max_new_tokens)
        stop = StoppingCriteriaList([loop_stopper(prompt.prompt_tokens)])
        with torch.inference_mode():
            output = self.model.generate(**inputs, generation_config=config, stopping_criteria=stop)
        sequences: torch.Tensor = output if isinstance(output, torch.Tensor) else output.sequences
        return [int(t) for t in sequences[0, prompt.prompt_tokens :].tolist()]

    def _budget(self, prompt: EncodedPrompt, max_new_tokens: int) -> int:
        if self.context_tokens is None:
            return max_new_tokens
        room = self.context_tokens - prompt.prompt_tokens
        if room < 1:
            raise VisionRejected(
                f"the prompt is {prompt.prompt_tokens} tokens ({prompt.image_tokens} of them the image) but the model "
                f"holds at most {self.context_tokens}"
            )
        return min(max_new_tokens, room)


def warm_up_request() -> VisionRequest:
    """What a model is asked once at load (`GlmEngine.warm_up`, `check_batching`): a caption of a small blank image."""
    blank = DecodedImage(Image.new("RGB", (56, 56), "white"), "PNG", 56, 56, 0, "")
    return VisionRequest(blank, task="caption")


def torch_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto`: bfloat16 on a GPU, float32 on the CPU; otherwise one of `stage_protocol.dtypes.DTYPES`."""
    import torch

    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return named_dtype(dtype)


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
