"""Tiny random chat checkpoints for tests: real transformers architectures, random weights, a word-level tokenizer.

Each builder writes a directory that production code loads with `from_pretrained` (config.json, safetensors weights,
tokenizer.json with a chat template) and returns its path. Random weights produce garbage text, so tests assert
types, token counts and determinism, never the words. A build takes a few tens of milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

T = TypeVar("T")
Stops = Literal["randomly", "never", "at_once"]
"""When generation ends: wherever the random weights emit an end token, never (end tokens are suppressed in
generation_config.json, so every generation uses its whole budget), or at once (every token ends a sequence)."""

_WORD_TEXT = (
    "system user assistant you are a helpful what is the total of this receipt coffee tea bread milk price "
    "line item sum amount paid cash card change answer yes no . , ? : $ 0 1 2 3 4 5 6 7 8 9"
)
WORDS = tuple(_WORD_TEXT.split())

LLAMA_SPECIALS = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
LLAMA_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

GLM_SPECIALS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)
GLM_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""The shape of GLM-4-0414's template: a `[gMASK]<sop>` prefix and role tokens, no closing tag per turn."""


TINY_DECODER: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
"""The size of every tiny decoder here: two layers, 32 wide, grouped-query attention."""


def build_tiny_llama(
    directory: Path,
    *,
    chat_template: str | None = LLAMA_CHAT_TEMPLATE,
    max_position_embeddings: int = 256,
    stops: Stops = "randomly",
) -> Path:
    """A 2-layer, 32-wide `LlamaForCausalLM` with a ChatML-style template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _word_tokenizer(LLAMA_SPECIALS, chat_template, unk="<unk>", bos="<s>", eos="<|im_end|>", pad="</s>")
    vocab = tokenizer.get_vocab()
    config = LlamaConfig(
        vocab_size=len(vocab),
        **TINY_DECODER,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["<|im_end|>"],
        pad_token_id=vocab["</s>"],
    )
    model = _seeded(lambda: LlamaForCausalLM(config))
    return _save(directory, model, tokenizer, stops=stops)


def build_tiny_glm4(
    directory: Path,
    *,
    max_position_embeddings: int = 256,
    stops: Stops = "randomly",
    architecture: Literal["glm4", "glm"] = "glm4",
) -> Path:
    """A 2-layer `Glm4ForCausalLM` (GLM-4-9B-0414's class), or `GlmForCausalLM` (glm-4-9b-chat-hf's) with
    `architecture="glm"`, with GLM's special tokens and a GLM-4-style chat template."""
    from transformers import Glm4Config, Glm4ForCausalLM, GlmConfig, GlmForCausalLM

    classes: tuple[type[Any], type[Any]] = (
        (Glm4Config, Glm4ForCausalLM) if architecture == "glm4" else (GlmConfig, GlmForCausalLM)
    )
    config_class, model_class = classes
    tokenizer = _word_tokenizer(
        GLM_SPECIALS, GLM_CHAT_TEMPLATE, unk="[MASK]", bos=None, eos="<|endoftext|>", pad="<|endoftext|>"
    )
    vocab = tokenizer.get_vocab()
    config = config_class(
        vocab_size=len(vocab),
        **TINY_DECODER,
        head_dim=8,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=vocab["<|endoftext|>"],
        eos_token_id=[vocab["<|endoftext|>"], vocab["<|user|>"], vocab["<|observation|>"]],
    )
    model = _seeded(lambda: model_class(config))
    return _save(directory, model, tokenizer, stops=stops)


def _word_tokenizer(
    specials: tuple[str, ...], chat_template: str | None, *, unk: str, bos: str | None, eos: str, pad: str
) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*specials, *WORDS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.add_special_tokens(list(specials))
    wrap: Callable[..., PreTrainedTokenizerFast] = PreTrainedTokenizerFast  # its __init__ is unannotated
    return wrap(
        tokenizer_object=backend,
        unk_token=unk,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        chat_template=chat_template,
    )


def _seeded(build: Callable[[], T]) -> T:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def _save(directory: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, *, stops: Stops) -> Path:
    if stops == "at_once":
        model.generation_config.eos_token_id = list(range(model.config.vocab_size))
    elif stops == "never":
        end: int | list[int] = model.generation_config.eos_token_id
        model.generation_config.suppress_tokens = end if isinstance(end, list) else [end]
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
