"""A transformers causal LM with a chat template, loaded and driven in this process: what the `local` backend
(`reasoning_stage.local`) generates with. torch and transformers are imported inside functions only.

Foreign errors are translated into the `reasoning_stage.errors` tree by `translate_error`, and only there.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from reasoning_stage.errors import (
    ReasoningError,
    ReasoningModelError,
    ReasoningRejected,
    ReasoningUnavailable,
)
from reasoning_stage.token_stream import TokenFeed
from reasoning_stage.types import ChatMessage
from stage_protocol.dtypes import named_dtype
from stage_protocol.generation import generation_config
from stage_protocol.loops import loop_stopper

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch
    from transformers import GenerationConfig, PreTrainedConfig, PreTrainedTokenizerBase, StoppingCriteriaList
    from transformers.generation.utils import GenerateOutput

Phase = Literal["load", "generate"]


def translate_error(exc: Exception, *, phase: Phase, model: str, hint: str | None = None) -> ReasoningError:
    """Map any exception raised while loading or running `model` into the reasoning error tree.

    Loading: everything is a `ReasoningModelError` naming the model and what to do (`hint`, or one derived from
    `model`). Generating: a bad value or a chat template refusing the conversation is `ReasoningRejected`; anything
    else (torch's RuntimeError, out of memory included) is `ReasoningUnavailable`. Our own errors pass through.
    """
    from jinja2 import TemplateError

    if isinstance(exc, ReasoningError):
        return exc
    detail = f"{type(exc).__name__}: {exc}"
    if phase == "load":
        hint = hint or _load_hint(model)
        return ReasoningModelError(f"could not load the reasoning model {model!r} ({detail}); {hint}")
    if isinstance(exc, ValueError | TemplateError):
        return ReasoningRejected(f"the reasoning model {model!r} refused the request ({detail})")
    return ReasoningUnavailable(f"the reasoning model {model!r} failed while generating ({detail})")


def _load_hint(model: str) -> str:
    if Path(model).expanduser().is_dir():
        return "check that the directory holds config.json, tokenizer files and weights of a causal LM"
    return (
        "it is neither an existing local directory nor a model in the local hub cache: point the reasoning model "
        "at a directory holding config.json, tokenizer files and weights, or allow downloads to fetch a hub id"
    )


@contextmanager
def translated(phase: Phase, model: str, hint: str | None = None) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        raise translate_error(exc, phase=phase, model=model, hint=hint) from exc


class CausalLM(Protocol):
    """The part of a transformers `PreTrainedModel` this backend uses, typed more tightly than its stubs."""

    config: PreTrainedConfig
    generation_config: GenerationConfig
    device: torch.device

    def generate(
        self,
        inputs: torch.Tensor,
        *,
        attention_mask: torch.Tensor,
        generation_config: GenerationConfig,
        streamer: TokenFeed | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
    ) -> torch.Tensor | GenerateOutput: ...


@dataclass(frozen=True)
class Completion:
    prompt_tokens: int
    token_ids: list[int]
    budget: int
    text: str


class ChatModel:
    """A tokenizer and a causal LM behind small typed methods; every call blocks, so run it in a worker thread."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, model: CausalLM) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.architecture = type(model).__name__
        self.context_tokens = _context_tokens(model, tokenizer)
        self.stop_ids = _stop_ids(model, tokenizer)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, source: str, *, device: str, dtype: str, local_files_only: bool) -> ChatModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with translated("load", source):
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
            if not getattr(tokenizer, "chat_template", None):
                raise ReasoningModelError(
                    f"the reasoning model {source!r} has no chat template (a base model, or a tokenizer saved "
                    "without `chat_template`); use an instruction-tuned chat model"
                )
            model: Any = AutoModelForCausalLM.from_pretrained(
                source, dtype=_torch_dtype(dtype), local_files_only=local_files_only
            )
            model.to(device).eval()
            chat = cls(tokenizer, model)
            chat.warm_up()
            return chat

    def warm_up(self) -> None:
        """Run the template and one decoding step now, so a broken checkpoint fails at load time and the first
        request does not pay for paging in lazily mapped weights."""
        self.complete(self.encode_chat((ChatMessage("user", "Hello"),)), max_new_tokens=1, temperature=0.0)

    def encode_chat(self, messages: tuple[ChatMessage, ...]) -> list[int]:
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        ids = self.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        token_ids = [i for i in ids if isinstance(i, int)] if isinstance(ids, list) else []
        if not isinstance(ids, list) or len(token_ids) != len(ids):
            raise ReasoningModelError(f"the chat template returned {type(ids).__name__}, not a list of token ids")
        return token_ids

    def encode_within_context(
        self, messages: tuple[ChatMessage, ...], max_new_tokens: int, *, model: str
    ) -> tuple[list[int], int]:
        """The prompt's token ids and the answer's budget: `max_new_tokens` within the room the model's context
        leaves; `ReasoningRejected` (naming `model`) when it leaves none."""
        prompt_ids = self.encode_chat(messages)
        if self.context_tokens is None:
            return prompt_ids, max_new_tokens
        room = self.context_tokens - len(prompt_ids)
        if room < 1:
            raise ReasoningRejected(
                f"the prompt is {len(prompt_ids)} tokens but {model!r} holds at most {self.context_tokens}; "
                "shorten the prompt"
            )
        return prompt_ids, min(max_new_tokens, room)

    def complete(
        self, prompt_ids: list[int], *, max_new_tokens: int, temperature: float, feed: TokenFeed | None = None
    ) -> list[int]:
        """The generated ids; generation also stops early once it loops (`stage_protocol.loops.loop_stopper`)."""
        import torch
        from transformers import StoppingCriteriaList

        inputs = torch.tensor([prompt_ids], dtype=torch.long, device=self.model.device)
        config = generation_config(
            self.model.generation_config, max_new_tokens, temperature=temperature,
            pad_token_id=min(self.stop_ids) if self.stop_ids else None,
        )  # fmt: skip
        with self._lock, torch.inference_mode():
            output = self.model.generate(
                inputs,
                attention_mask=torch.ones_like(inputs),
                generation_config=config,
                streamer=feed,
                stopping_criteria=StoppingCriteriaList([loop_stopper(len(prompt_ids))]),
            )
        sequences: torch.Tensor = output if isinstance(output, torch.Tensor) else output.sequences
        return [int(t) for t in sequences[0, len(prompt_ids) :].tolist()]

    def decode(self, token_ids: list[int]) -> str:
        """The text of `token_ids`, special tokens skipped, not stripped."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return text if isinstance(text, str) else "".join(text)


def _torch_dtype(dtype: str) -> torch.dtype | Literal["auto"]:
    if dtype == "auto":
        return "auto"
    try:
        return named_dtype(dtype)
    except ValueError as exc:
        raise ReasoningModelError(str(exc)) from None


def _context_tokens(model: CausalLM, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The longest sequence the model was built for, when its config or tokenizer says so."""
    config = model.config.get_text_config()
    for attribute in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = tokenizer.model_max_length
    return limit if isinstance(limit, int) and 0 < limit < 10**8 else None


def _stop_ids(model: CausalLM, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    declared: Any = model.generation_config.eos_token_id
    ids = set(declared if isinstance(declared, list) else [declared])
    ids.add(tokenizer.eos_token_id)
    return frozenset(i for i in ids if isinstance(i, int))
