"""Turning a vision request into GLM-4.6V model inputs, and generated token ids back into text.

The processor does the real work: its chat template writes the prompt (`[gMASK]<sop><|user|>`, one
`<|begin_of_image|><|image|><|end_of_image|>` placeholder, the task prompt, `/nothink` when thinking is off), and its
image processor resizes the image (`smart_resize`: sides rounded to multiples of 28 = patch 14 × merge 2, the pixel
count bounded by `size["longest_edge"]`), cuts it into 14×14 patches and expands the placeholder into one `<|image|>`
token per 2×2 block of patches: `grid_t·grid_h·grid_w / 4` tokens. Nothing here bypasses that path.

Two bounds are ours. `MAX_VISUAL_TOKENS` (GLM-4.6V-Flash's 6,144 per image) caps the image processor's budget even
when a checkpoint's preprocessor config allows more (transformers' default allows 7,500), so a very long or very large
image is scaled down to fit, never refused. And the image processor refuses an aspect ratio above 200:1, so a
thinner image is first padded with white to `MAX_ASPECT_RATIO`. Both are reported as notes on the result.

Every method blocks (the processor runs on the CPU): call them from a worker thread.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image

from vision_stage.parsing import BOX_CLOSE, BOX_OPEN, THINK_CLOSE, THINK_OPEN
from vision_stage.prompts import task_prompt
from vision_stage.types import VisionRequest

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

MAX_VISUAL_TOKENS = 6144
"""GLM-4.6V-Flash's limit of visual tokens per image."""
MAX_ASPECT_RATIO = 100.0
"""Thinner images are padded to this ratio first; the image processor refuses anything above 200:1."""
KEPT_MARKUP = (THINK_OPEN, THINK_CLOSE, BOX_OPEN, BOX_CLOSE)
"""Added tokens kept when decoding, because `vision_stage.parsing` reads them; other special tokens are dropped."""
PAD_COLOR = (255, 255, 255)


class ImageProcessor(Protocol):
    """The part of `Glm46VImageProcessor` (or `Glm4vImageProcessor`) read here."""

    size: Any
    """A transformers `SizeDict` (or a plain dict) with `shortest_edge` and `longest_edge` in pixels."""
    patch_size: int
    merge_size: int
    temporal_patch_size: int


class Processor(Protocol):
    """The part of `Glm46VProcessor` used here, typed more tightly than transformers' stubs."""

    tokenizer: PreTrainedTokenizerBase
    image_processor: ImageProcessor

    def apply_chat_template(self, conversation: list[dict[str, Any]], **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class VisualBudget:
    """How the image processor maps pixels to visual tokens, and the most tokens an image may take."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    min_pixels: int
    max_tokens: int

    @property
    def pixels_per_token(self) -> int:
        """`size` budgets count pixels over the temporal patch too (a still image is 2 identical frames)."""
        return self.temporal_patch_size * (self.patch_size * self.merge_size) ** 2

    def size(self) -> dict[str, int]:
        """The `size` the image processor is called with."""
        return {"shortest_edge": self.min_pixels, "longest_edge": self.max_tokens * self.pixels_per_token}


def visual_budget(image_processor: ImageProcessor, cap: int = MAX_VISUAL_TOKENS) -> VisualBudget:
    """The image processor's own budget, its token limit lowered to `cap` when it allows more."""
    size = image_processor.size
    longest, shortest = _size_entry(size, "longest_edge"), _size_entry(size, "shortest_edge")
    per_token = image_processor.temporal_patch_size * (image_processor.patch_size * image_processor.merge_size) ** 2
    own = longest // per_token if longest else cap
    return VisualBudget(
        patch_size=image_processor.patch_size,
        merge_size=image_processor.merge_size,
        temporal_patch_size=image_processor.temporal_patch_size,
        min_pixels=shortest or per_token,
        max_tokens=max(1, min(own, cap)),
    )


def _size_entry(size: Any, key: str) -> int | None:
    value = size.get(key) if isinstance(size, Mapping) or hasattr(size, "get") else None
    return int(value) if isinstance(value, int | float) and value > 0 else None


def visual_tokens(grid_thw: Sequence[int], merge_size: int) -> int:
    """The `<|image|>` tokens an image of patch grid (t, h, w) takes: one per `merge_size`² patches."""
    t, h, w = grid_thw
    return t * h * w // (merge_size * merge_size)


def pad_to_aspect_ratio(image: Image.Image, limit: float = MAX_ASPECT_RATIO) -> Image.Image:
    """`image` centred on a white canvas whose long side is at most `limit` times its short side; unchanged when it
    already is."""
    width, height = image.size
    if max(width, height) <= limit * min(width, height):
        return image
    size = (width, math.ceil(width / limit)) if width > height else (math.ceil(height / limit), height)
    canvas = Image.new("RGB", size, PAD_COLOR)
    canvas.paste(image.convert("RGB"), ((size[0] - width) // 2, (size[1] - height) // 2))
    return canvas


def chat_messages(image: Image.Image, text: str) -> list[dict[str, Any]]:
    """One user turn: the image, then the task text (GLM-4.6V's documented order)."""
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


@dataclass(frozen=True)
class EncodedPrompt:
    """Model inputs for one request, and what the processor made of the image.

    `inputs` holds `input_ids`, `attention_mask`, `pixel_values`, `image_grid_thw` and `mm_token_type_ids` as the
    processor returned them (on the CPU, but `pixel_values` on the codec's `image_device` when it has one); `grid` is
    the image's patch grid (t, h, w); `seen_size` is the (width, height) in pixels the model saw.
    """

    inputs: Mapping[str, torch.Tensor]
    prompt_tokens: int
    image_tokens: int
    grid: tuple[int, int, int]
    seen_size: tuple[int, int]
    notes: tuple[str, ...] = ()


def image_device(processor: Processor, model_device: Any) -> str | None:
    """Where `processor` should process images for a model on `model_device`: that device when it is a GPU and the
    image processor can work there (transformers' torchvision backend, which takes a `device`), else None (the CPU).
    On the GPU, resizing and cutting a 1024×1024 image into patches no longer takes a CPU core for tens of
    milliseconds before every cold prefill."""
    if getattr(model_device, "type", None) != "cuda":
        return None
    from transformers.image_processing_backends import TorchvisionBackend

    return str(model_device) if isinstance(processor.image_processor, TorchvisionBackend) else None


class GlmCodec:
    """A GLM-4.6V processor behind two typed methods: `encode` a request, `decode` generated ids.

    `image_device`: where the image processor resizes, normalises and cuts the image into patches (`pixel_values`
    then stay there), for processors that can (transformers' torchvision ones take a `device`); None: the CPU.
    `image_dtype`: the dtype `pixel_values` are kept in, the model's (its encoder converts them to it first thing):
    a 6,144-token image's pixels are 115 MB in float32, and each waiting request holds its own on the device."""

    def __init__(
        self,
        processor: Processor,
        *,
        max_visual_tokens: int = MAX_VISUAL_TOKENS,
        image_device: str | None = None,
        image_dtype: torch.dtype | None = None,
    ) -> None:
        self.processor = processor
        self.image_device = image_device
        self.image_dtype = image_dtype
        self.tokenizer = processor.tokenizer
        self.budget = visual_budget(processor.image_processor, max_visual_tokens)
        vocab = self.tokenizer.get_vocab()
        self.image_token_id = vocab.get("<|image|>")
        kept = {vocab[token] for token in KEPT_MARKUP if token in vocab}
        special = set(self.tokenizer.all_special_ids) | {
            i for i, token in self.tokenizer.added_tokens_decoder.items() if token.special
        }
        self._dropped = frozenset(special - kept)

    @classmethod
    def for_model(cls, processor: Processor, model: Any) -> GlmCodec:
        """The codec `GlmEngine.load` gives `model`: images processed on its GPU where `processor` can
        (`image_device`), their pixels kept in its dtype there."""
        placed = image_device(processor, model.device)
        return cls(processor, image_device=placed, image_dtype=model.dtype if placed is not None else None)

    def encode(self, request: VisionRequest, *, thinking: bool) -> EncodedPrompt:
        """The prompt for `request.task` through the processor's chat template, with the image."""
        image = request.image.pixels
        padded = pad_to_aspect_ratio(image)
        inputs = self.processor.apply_chat_template(
            chat_messages(padded, task_prompt(request.task, request.question)),
            tokenize=True,
            add_generation_prompt=True,
            return_dict=True,
            return_tensors="pt",
            enable_thinking=thinking,
            sanitize_control_tokens=True,  # text in the question stays text, never a control token or placeholder
            processor_kwargs={"images_kwargs": self._images_kwargs()},
        )
        if self.image_dtype is not None:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.image_dtype)
        encoded = self._encoded(inputs)
        notes = []
        if padded is not image:
            notes.append(_padded_note(image, padded))
        if self._bounded(padded, encoded.seen_size):
            notes.append(_scaled_note(padded, encoded.seen_size, self.budget.max_tokens))
        return dataclasses.replace(encoded, notes=tuple(notes))

    def _images_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"size": self.budget.size()}
        if self.image_device is not None:
            kwargs["device"] = self.image_device
        return kwargs

    def _encoded(self, inputs: Mapping[str, torch.Tensor]) -> EncodedPrompt:
        input_ids, grids = inputs["input_ids"], inputs["image_grid_thw"]
        if input_ids.shape[0] != 1 or grids.shape != (1, 3):
            shapes = f"input_ids {tuple(input_ids.shape)}, image_grid_thw {tuple(grids.shape)}"
            raise ValueError(f"expected one prompt with one image from the processor, got {shapes}")
        t, h, w = (int(n) for n in grids[0].tolist())
        image_tokens = int((input_ids[0] == self.image_token_id).sum()) if self.image_token_id is not None else 0
        patch = self.budget.patch_size
        return EncodedPrompt(dict(inputs), int(input_ids.shape[1]), image_tokens, (t, h, w), (w * patch, h * patch))

    def _bounded(self, image: Image.Image, seen: tuple[int, int]) -> bool:
        """Whether the token limit (not just rounding to whole patches) made the model see fewer pixels."""
        factor = self.budget.patch_size * self.budget.merge_size
        rounded = max(factor, round(image.width / factor) * factor) * max(factor, round(image.height / factor) * factor)
        return seen[0] * seen[1] < rounded

    def decode(self, token_ids: Sequence[int]) -> str:
        """The generated text with `<think>`, `</think>` and box markup kept and every other special token dropped."""
        kept = [i for i in token_ids if i not in self._dropped]
        text = self.tokenizer.decode(kept, skip_special_tokens=False)
        return text if isinstance(text, str) else "".join(text)


def _padded_note(image: Image.Image, padded: Image.Image) -> str:
    return (
        f"the {image.width}×{image.height} image was padded to {padded.width}×{padded.height} "
        f"(aspect ratio at most {MAX_ASPECT_RATIO:g}:1) before the model saw it"
    )


def _scaled_note(image: Image.Image, seen: tuple[int, int], max_tokens: int) -> str:
    return (
        f"the {image.width}×{image.height} image was scaled down to {seen[0]}×{seen[1]} to fit the model's limit "
        f"of {max_tokens} visual tokens"
    )
