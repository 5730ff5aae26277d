"""The `glm` vision backend: GLM-4.6V-Flash in this process, through transformers.

`GlmVisionBackend.load(model)` reads a local directory (or, with `allow_download`, a hub id) with `AutoProcessor` and
`AutoModelForImageTextToText`; the constructor takes an already-built `GlmEngine` (a model plus its processor), which
is how the GPU benchmark runs a full-size model with random weights. torch and transformers are imported inside
functions only, so importing this module stays cheap.

Each request is one greedy generation: the task prompt of `vision_stage.prompts` with the image through the
processor's chat template (`vision_stage.glm_codec`), thinking on or off through the template's `enable_thinking`.
The text is split into thinking and answer, grounding boxes are read out of the answer, and the describe task's JSON
is parsed (`vision_stage.parsing`) and rendered for the reasoning stage (`vision_stage.render`). Generation runs in a
worker thread, one request at a time.

Foreign errors are translated into the `vision_stage.errors` tree by `translate_error`, and only there:

=========  =========================================================  ====================================
phase      raised                                                     becomes
=========  =========================================================  ====================================
load       anything (our own errors too: a failed warm-up request)    VisionUnavailable, naming the model
                                                                      and what to do
encode,    MemoryError, torch.OutOfMemoryError (CUDA OOM included)    VisionUnavailable (retry_after_s=1)
generate
encode     ValueError, TypeError, jinja2 TemplateError (the processor  VisionRejected
           or the template refused the image or prompt)
generate   ValueError (the model refused its inputs)                  VisionRejected
encode,    anything else (torch's RuntimeError, CUDA errors)          VisionUnavailable
generate
decode     anything                                                   VisionInvalidOutput
=========  =========================================================  ====================================

After loading, our own `VisionError`s pass through unchanged. Unusable model output (no JSON where JSON was asked
for, an empty answer, thinking cut off by the token limit) is `VisionInvalidOutput`.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from PIL import Image

from stage_protocol.loops import LOOP_NOTE, WINDOW, loop_stopper, repeats_at_end
from vision_stage.backend import Health
from vision_stage.errors import VisionError, VisionInvalidOutput, VisionRejected, VisionUnavailable
from vision_stage.facts import image_facts
from vision_stage.glm_codec import MAX_VISUAL_TOKENS, EncodedPrompt, GlmCodec, Processor
from vision_stage.parsing import read_output
from vision_stage.types import (
    DecodedImage,
    ImageFacts,
    VisionRequest,
    VisionResult,
)

if TYPE_CHECKING:
    import torch
    from transformers import GenerationConfig, PreTrainedConfig
    from transformers.generation.utils import GenerateOutput

Phase = Literal["load", "encode", "generate", "decode"]
OOM_RETRY_AFTER_S = 1.0


def translate_error(exc: Exception, *, phase: Phase, model: str) -> VisionError:
    """Map any exception raised while loading or running `model` into the vision error tree (see the table above)."""
    import torch
    from jinja2 import TemplateError

    if isinstance(exc, VisionUnavailable) or (isinstance(exc, VisionError) and phase != "load"):
        return exc
    detail = f"{type(exc).__name__}: {exc}"
    if phase == "load":  # a checkpoint that fails its warm-up request is not loaded either
        return VisionUnavailable(f"could not load the glm vision model {model!r} ({detail}); {_hint(model)}")
    if phase == "decode":
        return VisionInvalidOutput(f"the glm vision model {model!r} wrote output that could not be read ({detail})")
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        message = f"the glm vision model {model!r} ran out of memory ({detail}); retry, or send a smaller image"
        return VisionUnavailable(message, retry_after_s=OOM_RETRY_AFTER_S)
    refused = (ValueError, TypeError, TemplateError) if phase == "encode" else (ValueError,)
    if isinstance(exc, refused):
        return VisionRejected(f"the glm vision model {model!r} refused the request ({detail})")
    doing = "preparing the inputs for" if phase == "encode" else "generating an answer to"
    return VisionUnavailable(f"the glm vision model {model!r} failed while {doing} the request ({detail})")


def _hint(model: str) -> str:
    if Path(model).expanduser().is_dir():
        return (
            "check that the directory holds a GLM-4.6V-Flash checkpoint: config.json, the weights, and the processor "
            "files (processor_config.json or preprocessor_config.json, tokenizer.json, chat_template.jinja)"
        )
    return (
        "it is neither an existing local directory nor in the local hub cache: download zai-org/GLM-4.6V-Flash to a "
        "directory and set ORCH_VISION__MODEL to it, or set ORCH_VISION__ALLOW_DOWNLOAD=true to fetch a hub id"
    )


@contextmanager
def _translated(phase: Phase, model: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        raise translate_error(exc, phase=phase, model=model) from exc


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
    """A GLM-4.6V model and its codec behind blocking methods; one generation at a time (run it in a worker
    thread)."""

    def __init__(self, model: ImageTextModel, codec: GlmCodec, *, name: str | None = None) -> None:
        self.model = model
        self.codec = codec
        self.architecture = type(model).__name__
        self.name = name or self.architecture
        """What error messages call the model: the directory or hub id it was loaded from."""
        text_config = model.config.get_text_config()
        limit = getattr(text_config, "max_position_embeddings", None)
        self.context_tokens: int | None = limit if isinstance(limit, int) and limit > 0 else None
        self._busy = threading.Lock()

    @classmethod
    def load(cls, source: str, *, device: str, dtype: str, local_files_only: bool) -> GlmEngine:
        """`from_pretrained` the processor and model from `source` (a directory, or a hub id) onto `device`, then
        warm up (blocking). Any failure is `VisionUnavailable`, naming `source` and what to do."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        expanded = Path(source).expanduser()
        source = str(expanded) if expanded.is_dir() else source
        with _translated("load", source):
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
            engine = cls(model.eval(), GlmCodec(processor, max_visual_tokens=MAX_VISUAL_TOKENS), name=source)
            engine.warm_up()
            return engine

    def warm_up(self) -> None:
        """Encode a small image and generate one token, so a broken checkpoint fails now and not on a request."""
        blank = DecodedImage(Image.new("RGB", (56, 56), "white"), "PNG", 56, 56, 0, "")
        self.generate(VisionRequest(blank, task="caption"), thinking=False, max_new_tokens=1)

    def generate(self, request: VisionRequest, *, thinking: bool, max_new_tokens: int) -> Generation:
        """Greedy generation for `request`; raises only `VisionError`s."""
        model_name = self.name
        with self._busy:
            with _translated("encode", model_name):
                prompt = self.codec.encode(request, thinking=thinking)
            budget = self._budget(prompt, max_new_tokens)
            with _translated("generate", model_name):
                ids = self.generate_ids(prompt, budget)
            with _translated("decode", model_name):
                text = self.codec.decode(ids)
        return Generation(text, prompt, len(ids), budget, looped=repeats_at_end(ids[-WINDOW:]))

    def generate_ids(self, prompt: EncodedPrompt, max_new_tokens: int) -> list[int]:
        """The new token ids of one greedy generation (blocking; foreign errors are not translated here), stopped
        early once it loops (`stage_protocol.loops.loop_stopper`: GLM-4.6V can overthink and repeat)."""
        import torch
        from transformers import StoppingCriteriaList

        inputs = {name: tensor.to(self.model.device) for name, tensor in prompt.inputs.items()}
        config = greedy_config(self.model.generation_config, max_new_tokens)
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


def greedy_config(base: GenerationConfig, max_new_tokens: int) -> GenerationConfig:
    """`base` (the checkpoint's generation config) set to greedy decoding of at most `max_new_tokens` tokens."""
    config = copy.deepcopy(base)
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    config.do_sample = False
    config.temperature, config.top_p, config.top_k = None, None, None  # no warning about unused sampling settings
    if config.pad_token_id is None:
        end: Any = config.eos_token_id
        config.pad_token_id = end[0] if isinstance(end, list) and end else end
    return config


def torch_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto`: bfloat16 on a GPU, float32 on the CPU; otherwise a torch dtype name (`float16`, `bfloat16`, ...)."""
    import torch

    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return value


class GlmVisionBackend:
    """GLM-4.6V-Flash in this process; one generation at a time, each in a worker thread."""

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
    ) -> GlmVisionBackend:
        """Load `model` (a local directory, or a hub id fetched only with `allow_download`) in a worker thread."""
        engine = await asyncio.to_thread(
            GlmEngine.load, model, device=device, dtype=dtype, local_files_only=not allow_download
        )
        return cls(engine, model=model, device=device, thinking=thinking, max_new_tokens=max_new_tokens)

    @property
    def engine(self) -> GlmEngine:
        """The loaded model and codec; `VisionUnavailable` once closed."""
        if self._engine is None:
            raise VisionUnavailable(f"the glm vision backend ({self.model}) is closed")
        return self._engine

    async def generate(self, request: VisionRequest) -> VisionResult:
        started = time.perf_counter()
        async with self._queue:
            engine = self.engine
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
        with _translated("decode", self.model):  # Pillow, measuring the image's colours
            facts = image_facts(request.image)
        return generation, facts

    async def health(self) -> Health:
        if self._engine is None:
            return Health(ok=False, detail="closed")
        dtype = str(self._engine.model.dtype).removeprefix("torch.")
        return Health(ok=True, detail=f"{self.model} ({self.architecture}, {dtype}) on {self.device}")

    async def aclose(self) -> None:
        async with self._queue:  # let an in-flight generation finish first
            self._engine = None
