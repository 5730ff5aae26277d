"""The `glm` vision backend's model side (`vision_stage.glm`): `GlmEngine`, GLM-4.6V-Flash and its processor in this
process, loaded from a local directory (or, allowed, a hub id), warmed up, and generating greedily through plain
`model.generate` or handing a prompt to its batching engine (`batch_engine.engine`), which `check_batching` checks
against plain `generate` at load. torch and transformers are imported inside functions only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image

from batch_engine.attention_plans import plan_by_power_of_two
from batch_engine.settings import EngineSettings
from batch_engine.start import agrees, started
from batch_engine.types import Completion, Refusals
from stage_protocol.dtypes import named_dtype
from stage_protocol.generation import generation_config
from stage_protocol.loops import WINDOW, loop_stopper, repeats_at_end
from vision_stage.errors import VisionRejected, VisionUnavailable
from vision_stage.glm_codec import EncodedPrompt, GlmCodec, Processor
from vision_stage.glm_errors import translated
from vision_stage.types import DecodedImage, VisionRequest

if TYPE_CHECKING:
    import torch
    from transformers import GenerationConfig, PreTrainedConfig
    from transformers.generation.utils import GenerateOutput

    from batch_engine.engine import BatchEngine

REFUSALS = Refusals(VisionRejected, VisionUnavailable, "ORCH_VISION__ENGINE")
"""What the batching engine refuses, as the vision stage's errors."""


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
            engine = cls(model.eval(), GlmCodec.for_model(processor, model), name=source)
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
