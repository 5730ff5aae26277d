"""The `local` backend on the batching engine (`batch_engine`): concurrent greedy requests decoded together on one
device, the same engine and code path the vision stage's `glm` backend runs GLM-4.6V-Flash on.

Nothing here depends on the model's name: the engine reads what it needs from the model (plain positions for a
text model, its decoder and its end tokens), so GLM-4, Llama-style models and the embedded SmolLM2 all run on it.
Requests with `temperature > 0` are not the engine's (it decodes greedily) and go through plain `generate`
(`reasoning_stage.local`). torch is imported inside functions only.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from batch_engine.engine import BatchEngine
from batch_engine.start import agrees, started
from batch_engine.types import Refusals
from reasoning_stage.chat_model import ChatModel, Completion, translate_error, translated
from reasoning_stage.errors import ReasoningModelError, ReasoningRejected, ReasoningUnavailable
from reasoning_stage.token_stream import deliver_to
from reasoning_stage.types import ChatMessage, ReasoningRequest

if TYPE_CHECKING:
    from batch_engine.settings import EngineSettings


REFUSALS = Refusals(ReasoningRejected, ReasoningUnavailable, "ORCH_REASONING__ENGINE")
"""What the batching engine refuses, as the reasoning stage's errors."""
CHECKED_TOKENS = 8
"""Tokens of the warm-up prompt compared with plain `generate` at start."""


def start_engine(chat: ChatModel, settings: EngineSettings, model: str) -> BatchEngine:
    """The batching engine over `chat`'s model, started (`batch_engine.start.started`; a failure to start is a
    `ReasoningModelError` saying what to lower) and checked against plain `generate` on a warm-up prompt."""
    engine = started(
        chat.model, settings, REFUSALS, model_name=f"the reasoning model {model!r}", fails=ReasoningModelError
    )
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
        return agrees(engine, _inputs(prompt), expected, what="the warm-up prompt")


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
