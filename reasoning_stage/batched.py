"""The `local` backend on the batching engine (`batch_engine`): concurrent greedy requests decoded together on one
device, the same engine and code path the vision stage's `glm` backend runs GLM-4.6V-Flash on.

Nothing here depends on the model's name: the engine reads what it needs from the model (plain positions for a
text model, its decoder and its end tokens), so GLM-4, Llama-style models and the embedded SmolLM2 all run on it.
Requests with `temperature > 0` are not the engine's (it decodes greedily) and go through plain `generate`
(`reasoning_stage.local`). torch is imported inside functions only.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from batch_engine.engine import BatchEngine
from batch_engine.types import Refusals
from reasoning_stage.chat_model import ChatModel, Completion, translate_error, translated
from reasoning_stage.errors import ReasoningModelError, ReasoningRejected, ReasoningUnavailable
from reasoning_stage.token_stream import deliver_to
from reasoning_stage.types import ChatMessage, ReasoningRequest

if TYPE_CHECKING:
    from batch_engine.settings import EngineSettings

log = logging.getLogger(__name__)

REFUSALS = Refusals(ReasoningRejected, ReasoningUnavailable, "ORCH_REASONING__ENGINE_MAX_TOKENS")
"""What the batching engine refuses, as the reasoning stage's errors."""
CHECKED_TOKENS = 8
"""Tokens of the warm-up prompt compared with plain `generate` at start."""


def start_engine(chat: ChatModel, settings: EngineSettings, model: str) -> BatchEngine:
    """The batching engine over `chat`'s model, started (blocking: on a GPU it compiles and captures its CUDA graphs)
    and checked against plain `generate` on a warm-up prompt (a difference is logged: in bfloat16 the two attention
    paths round differently and may part at a near-tie; in float32 it would be a bug). A failure to start is a
    `ReasoningModelError` saying what to lower: the KV cache of every slot is allocated here."""
    try:
        engine = BatchEngine(chat.model, settings, REFUSALS)
        engine.start()
    except Exception as exc:
        raise ReasoningModelError(
            f"could not start the batching engine of the reasoning model {model!r} ({type(exc).__name__}: {exc}); "
            f"its {settings.slots} slots of {settings.max_tokens} tokens may not fit: lower "
            "ORCH_REASONING__ENGINE_SLOTS or ORCH_REASONING__ENGINE_MAX_TOKENS, or set ORCH_REASONING__ENGINE=generate"
        ) from exc
    try:
        matches_generate(chat, engine)
    except BaseException:
        engine.close()
        raise
    return engine


def matches_generate(chat: ChatModel, engine: BatchEngine, tokens: int = CHECKED_TOKENS) -> bool:
    """Whether the engine's first `tokens` greedy tokens for a warm-up prompt equal plain `generate`'s (blocking)."""
    with translated("load", chat.architecture):
        prompt = chat.encode_chat((ChatMessage("user", "Hello"),))
        expected = chat.complete(prompt, max_new_tokens=tokens, temperature=0.0)
        future = engine.submit(_inputs(prompt), image_key=None, max_new_tokens=tokens)
        got = future.result(timeout=600).ids
    if got != expected:
        log.warning(
            "local backend: the batching engine's first tokens %s differ from plain generate's %s on the warm-up "
            "prompt (%s)", got, expected, getattr(chat.model, "dtype", "?"),
        )  # fmt: skip
    return got == expected


async def complete(
    engine: BatchEngine,
    chat: ChatModel,
    request: ReasoningRequest,
    *,
    model: str,
    pieces: asyncio.Queue[list[int] | None] | None,
) -> Completion:
    """`request` through the engine: each new token id into `pieces` as it is chosen (then None), when streaming.
    Cancelling the awaiting task abandons the request (`BatchEngine.wait`). Raises only `ReasoningError`s."""
    try:
        prompt_ids, budget = await asyncio.to_thread(_encode, engine, chat, request, model)
        deliver = deliver_to(pieces) if pieces is not None else None
        with translated("generate", model):
            future = engine.submit(
                _inputs(prompt_ids),
                image_key=None,
                max_new_tokens=budget,
                on_token=(lambda token: deliver([token])) if deliver is not None else None,
            )
        try:
            done = await engine.wait(future)
        except Exception as exc:
            raise translate_error(exc, phase="generate", model=model) from exc
    finally:
        if pieces is not None:  # after every token: the engine scheduled those before it set the result
            pieces.put_nowait(None)
    return Completion(len(prompt_ids), done.ids, budget, chat.decode(done.ids).strip())


def _encode(engine: BatchEngine, chat: ChatModel, request: ReasoningRequest, model: str) -> tuple[list[int], int]:
    """The prompt's token ids and the answer's budget: the request's, within the model's context and the slot."""
    with translated("generate", model):
        prompt_ids, budget = chat.encode_within_context(request.messages, request.max_new_tokens, model=model)
    slot_room = engine.settings.max_tokens - len(prompt_ids)  # none at all: `submit` rejects it
    return prompt_ids, max(1, min(budget, slot_room))


def _inputs(prompt_ids: list[int]) -> dict[str, object]:
    import torch

    return {"input_ids": torch.tensor([prompt_ids])}
