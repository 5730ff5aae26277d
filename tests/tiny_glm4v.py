"""A tiny random GLM-4.6V-shaped checkpoint: the real model, processor and image-processor classes, random weights.

`build_tiny_glm4v` writes a directory that `GlmVisionBackend.load` reads with the production `from_pretrained` code:
config.json and safetensors weights of a 2-layer `Glm4vForConditionalGeneration` (model_type `glm4v`, as the real
GLM-4.6V-Flash; `architecture="glm46v"` gives `Glm46VForConditionalGeneration`), a word-level tokenizer holding
GLM's special tokens, the real `Glm46VImageProcessor` (smart resize, patch 14, 2×2 merge) with a small pixel budget,
`Glm46VVideoProcessor`, and a GLM-4.6V-style chat template (`[gMASK]<sop>`, role tokens, image placeholders, and
`enable_thinking=False` → `/nothink` after the user turn and an empty `<think></think>` opening the answer). A build
takes well under a second.

`full_size_glm46v_flash` builds the full GLM-4.6V-Flash architecture with random weights (for the GPU benchmark and
the GPU tests), with the real-sized vocabulary of `glm_tokenizer(vocab_size=151_552)`: GLM's special tokens at the ids
the model config expects, filler words elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tests.tiny_models import GLM_SPECIALS, WORDS

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerFast, ProcessorMixin

Architecture = Literal["glm4v", "glm46v"]

CONTROL_TOKENS = (
    *GLM_SPECIALS,
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
)
"""Special tokens: skipped by `decode(skip_special_tokens=True)`."""
MARKUP_TOKENS = ("<think>", "</think>", "<|begin_of_box|>", "<|end_of_box|>", "/nothink")
"""Added tokens the model writes as part of its answer (kept when decoding)."""
STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")

FULL_SIZE_IDS: Mapping[str, int] = {
    "<|endoftext|>": 151329,
    "[MASK]": 151330,
    "[gMASK]": 151331,
    "[sMASK]": 151332,
    "<sop>": 151333,
    "<eop>": 151334,
    "<|system|>": 151335,
    "<|user|>": 151336,
    "<|assistant|>": 151337,
    "<|observation|>": 151338,
    "<|begin_of_image|>": 151339,
    "<|end_of_image|>": 151340,
    "<|image|>": 151343,
    "<|video|>": 151344,
    "<think>": 151350,
    "</think>": 151351,
    "<|begin_of_box|>": 151357,
    "<|end_of_box|>": 151358,
    "/nothink": 151360,
    "<|begin_of_video|>": 151361,
    "<|end_of_video|>": 151362,
}
"""Where the full-size vocabulary puts GLM's special tokens: the image and video ids are `Glm46VConfig`'s defaults;
the others only need to be distinct."""

GLM46V_CHAT_TEMPLATE = """[gMASK]<sop>
{%- macro text_of(content) -%}
{%- if content is string -%}{{ content }}
{%- else -%}{%- for part in content -%}{%- if part.type == 'text' -%}{{ part.text }}{%- endif -%}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- set no_think = enable_thinking is defined and not enable_thinking -%}
{%- for m in messages -%}
{%- if m.role == 'system' -%}<|system|>
{{ text_of(m.content) }}
{%- elif m.role == 'user' -%}<|user|>
{% if m.content is string -%}{{ m.content }}
{%- else -%}{%- for part in m.content -%}
{%- if part.type == 'image' -%}<|begin_of_image|><|image|><|end_of_image|>
{%- elif part.type == 'video' -%}<|begin_of_video|><|video|><|end_of_video|>
{%- elif part.type == 'text' -%}{{ part.text }}
{%- endif -%}
{%- endfor -%}{%- endif -%}
{%- if no_think and not text_of(m.content).endswith('/nothink') -%}/nothink{%- endif -%}
{%- elif m.role == 'assistant' -%}<|assistant|>
{{ text_of(m.content) }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|assistant|>
{% if no_think -%}<think></think>
{% endif -%}
{%- endif -%}"""
"""Written for these tests after the shape of GLM-4.5V/4.6V's template: thinking is on unless the caller passes
`enable_thinking=False`, which appends `/nothink` to each user turn and pre-fills an empty thinking block."""


def build_tiny_glm4v(
    directory: Path,
    *,
    max_visual_tokens: int = 64,
    architecture: Architecture = "glm4v",
    free_text: bool = True,
) -> Path:
    """Write the tiny checkpoint to `directory` and return it.

    `max_visual_tokens` bounds every image through the image processor's `size["longest_edge"]`. With `free_text`
    (the default) generation can emit no special or markup token, so it always uses its whole budget of plain words:
    deterministic, non-empty text for every task; without it the random weights may stop at once or write markup.
    """
    tokenizer = glm_tokenizer()
    processor = glm_processor(tokenizer, max_visual_tokens=max_visual_tokens, min_visual_tokens=4)
    model = _seeded(lambda: tiny_glm4v_model(tokenizer, architecture))
    if free_text:
        ids = tokenizer.get_vocab()
        model.generation_config.suppress_tokens = [ids[token] for token in (*CONTROL_TOKENS, *MARKUP_TOKENS)]
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def glm_tokenizer(*, vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with GLM's special tokens: a few dozen ids, or `vocab_size` ids with the special tokens
    at `FULL_SIZE_IDS` and filler words elsewhere (for a full-size model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = _vocabulary(vocab_size)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[MASK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.add_special_tokens(list(CONTROL_TOKENS))
    backend.add_tokens(list(MARKUP_TOKENS))
    wrap: Callable[..., PreTrainedTokenizerFast] = PreTrainedTokenizerFast  # its __init__ is unannotated
    return wrap(tokenizer_object=backend, unk_token="[MASK]", eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _vocabulary(vocab_size: int | None) -> dict[str, int]:
    specials = (*CONTROL_TOKENS, *MARKUP_TOKENS)
    if vocab_size is None:
        return {token: i for i, token in enumerate((*specials, *WORDS))}
    vocab = dict(FULL_SIZE_IDS)
    taken = set(FULL_SIZE_IDS.values())
    free = (i for i in range(vocab_size) if i not in taken)
    for word, i in zip((*WORDS, *(f"w{n}" for n in range(vocab_size))), free, strict=False):
        vocab[word] = i
    return vocab


def glm_processor(
    tokenizer: PreTrainedTokenizerFast, *, max_visual_tokens: int, min_visual_tokens: int = 4
) -> ProcessorMixin:
    """The real `Glm46VProcessor` over `tokenizer`, its image processor bounded to `max_visual_tokens` per image."""
    from transformers import Glm46VImageProcessor, Glm46VProcessor, Glm46VVideoProcessor

    pixels_per_token = 2 * 28 * 28  # temporal patch 2 × (patch 14 × merge 2)²
    size = {"shortest_edge": min_visual_tokens * pixels_per_token, "longest_edge": max_visual_tokens * pixels_per_token}
    build: Callable[..., ProcessorMixin] = Glm46VProcessor
    return build(
        image_processor=Glm46VImageProcessor(size=size),
        tokenizer=tokenizer,
        video_processor=Glm46VVideoProcessor(),
        chat_template=GLM46V_CHAT_TEMPLATE,
    )


def tiny_glm4v_model(tokenizer: PreTrainedTokenizerFast, architecture: Architecture = "glm4v") -> Any:
    """A 2-layer, 32-wide random model whose special token ids are `tokenizer`'s."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration, Glm46VConfig, Glm46VForConditionalGeneration

    ids = tokenizer.get_vocab()
    text = {
        "vocab_size": len(ids),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 1024,
        "pad_token_id": ids["<|endoftext|>"],
        # head_dim 16 × partial_rotary_factor 0.5 = 8 rotary dims = 4 frequencies, split over (t, h, w)
        "rope_parameters": {"rope_type": "default", "rope_theta": 2.0, "partial_rotary_factor": 0.5,
                            "mrope_section": [2, 1, 1]},
    }  # fmt: skip
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 32,
        "image_size": 112,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    tokens = {
        "image_token_id": ids["<|image|>"],
        "video_token_id": ids["<|video|>"],
        "image_start_token_id": ids["<|begin_of_image|>"],
        "image_end_token_id": ids["<|end_of_image|>"],
        "video_start_token_id": ids["<|begin_of_video|>"],
        "video_end_token_id": ids["<|end_of_video|>"],
    }
    configure: Callable[..., Any] = Glm46VConfig if architecture == "glm46v" else Glm4vConfig
    config = configure(text_config=text, vision_config=vision, **tokens)
    model = (
        Glm46VForConditionalGeneration(config) if architecture == "glm46v" else Glm4vForConditionalGeneration(config)
    )
    _stop_at_glm_stop_tokens(model, tokenizer)
    return model


def full_size_glm46v_flash(device: str, dtype: torch.dtype) -> tuple[Any, ProcessorMixin]:
    """GLM-4.6V-Flash's full architecture with random weights on `device`, and a processor over a real-sized
    vocabulary: `Glm46VConfig()` defaults with the text rotary embedding at `partial_rotary_factor` 0.5, as in the
    real config (about 10.3 B parameters; 20.6 GB in bfloat16). The true compute of the real model, garbage text."""
    import torch
    from transformers import AutoModelForImageTextToText, Glm46VConfig

    tokenizer = glm_tokenizer(vocab_size=151_552)
    processor = glm_processor(tokenizer, max_visual_tokens=6144, min_visual_tokens=8)
    config = Glm46VConfig()
    text_config: Any = config.text_config
    text_config.rope_parameters = {**text_config.rope_parameters, "partial_rotary_factor": 0.5}
    from_config: Callable[..., Any] = AutoModelForImageTextToText.from_config  # unannotated in transformers
    with torch.device(device):
        model = from_config(config, dtype=dtype)
    _stop_at_glm_stop_tokens(model.eval(), tokenizer)
    return model, processor


def _stop_at_glm_stop_tokens(model: Any, tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.get_vocab()
    model.generation_config.eos_token_id = [ids[token] for token in STOP_TOKENS]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]


def _seeded(build: Callable[[], Any]) -> Any:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()
