"""The vision encoder's attention over its packed patches as one opaque operation, so that a compiled encoder block
is one graph.

transformers' GLM-4V encoder packs every image's patches into one sequence with cumulative bounds (`cu_seqlens`).
Under its `sdpa` implementation each attention layer reads those bounds to the host (`tolist`), splits the patches
per image and calls `scaled_dot_product_attention` once per image: `torch.compile` breaks each block's graph there.
Only implementations whose name contains "flash" are handed the bounds instead. `packed_attention`, registered under
`VISION_ATTENTION` (a name with "flash" in it for that reason), takes them and calls the custom operator
`batch_engine::packed_attention`: one `scaled_dot_product_attention` for a single image (the engine encodes one
image a prompt), one per image otherwise. A custom operator is one node to the compiler, so the block around it
compiles whole, and PyTorch picks the attention kernel (flash, cuDNN, memory-efficient) for the real tensors at
run time, as it does eagerly.

The arithmetic is the `sdpa` path's: the same call on the same tensors, per image.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from batch_engine.attention_plans import arranged, planned_on
from batch_engine.operators import define_operator

if TYPE_CHECKING:
    import torch

VISION_ATTENTION = "batch_engine_flash_packed"
"""The name `packed_attention` is registered under (transformers' `AttentionInterface`)."""


@functools.cache
def _define() -> None:
    """Define `batch_engine::packed_attention` once (importing this module imports no torch); `packed_attention`
    calls it through `torch.ops`, which a compiler traces as one node."""
    schema = "(Tensor query, Tensor key, Tensor value, Tensor bounds, float scale) -> Tensor"
    define_operator("packed_attention", schema, _attend, lambda query, *_: query.shape)


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: torch.Tensor, scale: float) -> Any:
    """The operator: (patches, heads, head dim) each → the same, attending within each image."""
    import torch
    from torch.nn.functional import scaled_dot_product_attention as attention

    query, key, value = (tensor.transpose(0, 1).unsqueeze(0) for tensor in (query, key, value))
    if bounds.numel() == 2:
        images = [(query, key, value)]
    else:
        sizes = bounds.diff().tolist()
        images = list(zip(*(torch.split(tensor, sizes, dim=2) for tensor in (query, key, value)), strict=True))
    if planned_on(query.device):  # each image's own, as cuDNN's plans per power of two need them, or as it recurs
        images = [arranged(q, k, v, causal=False, scale=scale, gqa=False) for q, k, v in images]
    outs = [attention(q, k, v, scale=scale) for q, k, v in images]
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=2))[0].transpose(0, 1).contiguous()


def packed_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    dropout: float = 0.0,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface for the encoder (`VISION_ATTENTION`): bidirectional attention within each
    image whose bounds `cu_seq_lens_q` gives (all the patches one image without them). For inference only: a
    model in training mode (attention dropout) is refused."""
    import torch

    if dropout:
        raise ValueError(f"the engine's vision attention has no dropout ({dropout}): the model must be in eval mode")

    if cu_seq_lens_q is None:
        cu_seq_lens_q = torch.tensor([0, query.shape[2]], device=query.device)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # The encoder hands (1, heads, patches, head dim) views of (patches, heads, head dim) tensors: the operator takes
    # the latter, so that a compiled block writes its rotated query and key in that order. The kernel that writes
    # them took 108 µs a block on an H100 for a 1024×1024 image while the head count was symbolic, 25 µs with it
    # constant (`batch_engine.compiling.encoder_settings`); in the transposed order, about 110 µs with the count
    # symbolic and 25 compiled for the one size.
    query, key, value = (tensor[0].transpose(0, 1) for tensor in (query, key, value))
    return torch.ops.batch_engine.packed_attention(query, key, value, cu_seq_lens_q, scale).unsqueeze(0), None


def register_vision_attention(model: Any) -> bool:
    """Register `packed_attention` and make `model`'s vision encoder use it, where the encoder is transformers' GLM-4V
    encoder as run under `sdpa` (other implementations and other encoders are left as they are). Idempotent; True
    when the encoder runs it."""
    from transformers import AttentionInterface

    visual = getattr(getattr(model, "model", None), "visual", None)
    config = getattr(visual, "config", None)
    if config is None or getattr(config, "model_type", None) != "glm4v_vision":
        return False
    if config._attn_implementation not in ("sdpa", VISION_ATTENTION):
        return False
    _define()
    AttentionInterface.register(VISION_ATTENTION, packed_attention)
    config._attn_implementation = VISION_ATTENTION
    return True
