"""The transformers generation config an in-process model's plain `generate` runs with: the `glm` vision backend's
and the `local` reasoning backend's."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import GenerationConfig


def generation_config(
    base: GenerationConfig, max_new_tokens: int, *, temperature: float = 0.0, pad_token_id: int | None = None
) -> GenerationConfig:
    """A copy of `base` (the checkpoint's) for at most `max_new_tokens` new tokens: sampled at `temperature` above 0,
    else greedy, with the checkpoint's sampling defaults dropped so that `generate` does not warn about them. A
    checkpoint without a pad token pads with `pad_token_id`, or else its (first) end token."""
    config = copy.deepcopy(base)
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    config.do_sample = temperature > 0
    if config.do_sample:
        config.temperature = temperature
    else:
        config.temperature, config.top_p, config.top_k = None, None, None
    if config.pad_token_id is None:
        end: Any = config.eos_token_id if pad_token_id is None else pad_token_id
        config.pad_token_id = end[0] if isinstance(end, list) and end else end
    return config
