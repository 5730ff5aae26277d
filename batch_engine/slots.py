"""Slot KV storage for the batching engine (`batch_engine.engine`) and the attention that reads it.

`SlotCache` is a transformers `Cache` whose storage is one tensor per K and V, shaped
(layers, slots, kv heads, max tokens, head dim): a request owns one slot (row) from its prefill to its last token,
and the rows in use are always the first ones, so a decode step over `b` requests reads the views `[:, :b]` and
needs no gather. GLM-4.6V-Flash holds about 40 KB of KV per token (40 layers × 2 KV heads × 128 × K and V in
bfloat16), so contiguous slots suffice: 32 slots of 8,192 tokens are 10.7 GB.

The model's attention layers call `update` with the new tokens' K and V; it writes them where the engine's current
`target` says (a prefill's slot and offset, each decoding row at its length, or both when rows ride along in a
prefill) and returns views of the stored K and V: a decode step's write inside the compiled layer's graph, in place;
a prefill's or an extend step's outside it.
`slot_attention`, registered with transformers' attention interface as `ATTENTION`, then attends with the engine's
mask: a decode step groups each KV head's query heads and multiplies against the stored K and V as they
are (no sixteen-fold copy of K and V for GQA), a prefill uses `scaled_dot_product_attention` with `enable_gqa`,
and a prefill with rows riding along does both, each for its own queries (`ride_along_attention`, one opaque operator).
Called without the engine's `slot_step` keyword (plain `generate` on the same model), it is transformers' `sdpa`.

The KV of prompt prefixes and the vision encoder's output are kept apart from the slots (`batch_engine.stores`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batch_engine.attention_plans import arranged, planned_on, positions_outer
from batch_engine.operators import define_operator

if TYPE_CHECKING:
    import torch

ATTENTION = "batch_engine_slots"
"""The name `slot_attention` is registered under (transformers' `AttentionInterface`)."""


@dataclass(frozen=True)
class Prefill:
    """Write the new tokens into `slot` from position `start`; attend to the slot's first `start + n` tokens."""

    slot: int
    start: int


@dataclass(frozen=True)
class Padded:
    """A prefill from position 0 into row `rows[0]` (a tensor, so that one CUDA graph serves every row), padded to
    its length bucket: write the new tokens from position 0; attend to them alone (the padding lands past the prompt,
    masked until decoding overwrites it, as an `Extend` step's)."""

    rows: torch.Tensor


@dataclass(frozen=True)
class Decode:
    """Write one token per row `rows[i]` at `lengths[i]`; attend to each row's first `span` positions (masked)."""

    rows: torch.Tensor
    lengths: torch.Tensor
    span: int


@dataclass(frozen=True)
class Extend:
    """Write `count` tokens into row `rows[0]` from position `start[0]` on; attend to its first `span` positions."""

    rows: torch.Tensor
    start: torch.Tensor
    count: int
    span: int


@dataclass(frozen=True)
class RideAlong:
    """A prefill from position 0 into row `slot` with rows `rows` (the rows before it) decoding one token each in the
    same forward: the new tokens are the prompt's, written from position 0, then one per decoding row, written at
    its `lengths[i]`; each decoding row attends to its first `span` positions (masked)."""

    slot: int
    rows: torch.Tensor
    lengths: torch.Tensor
    span: int


@dataclass(frozen=True)
class SlotStep:
    """The engine's keyword to `slot_attention`: `causal` when a prefill starts at position 0 (no mask needed);
    `grouped` for decode and extend steps (query heads grouped per KV head, masked); `kernel`: a decode step's
    attention through `batch_engine.decode_attention` (CUDA and Triton only); `riding`: a prefill with decoding
    rows in its forward (`RideAlong`), the mask being theirs; `positions_outer`: a prefill from position 0 hands its
    attention queries, keys and values laid out positions outer, as cuDNN's plans per power of two need them
    (`batch_engine.attention_plans`)."""

    causal: bool
    grouped: bool = False
    kernel: bool = False
    riding: bool = False
    positions_outer: bool = False


def cache_class() -> type:
    """`SlotCache`, defined on first use so that importing this module does not import transformers."""
    global _SLOT_CACHE
    if _SLOT_CACHE is None:
        _SLOT_CACHE = _define_slot_cache()
    return _SLOT_CACHE


_SLOT_CACHE: type | None = None


def _define_slot_cache() -> type:
    import torch
    from transformers.cache_utils import Cache

    class SlotCache(Cache):
        """K and V of every slot, written where `target` says (module docstring)."""

        def __init__(
            self, *, layers: int, slots: int, max_tokens: int, kv_heads: int, head_dim: int, dtype: Any, device: Any
        ) -> None:
            super().__init__(layers=[])
            shape = (layers, slots, kv_heads, max_tokens, head_dim)
            self.keys = torch.zeros(shape, dtype=dtype, device=device)
            self.values = torch.zeros(shape, dtype=dtype, device=device)
            self.offsets = torch.arange(max_tokens, device=device)
            self.layer_ids = torch.arange(layers, device=device)
            self.head_ids = torch.arange(kv_heads, device=device).view(1, kv_heads)
            self.target: Prefill | Padded | Decode | Extend | RideAlong = Prefill(0, 0)

        @property
        def nbytes(self) -> int:
            return int(self.keys.nbytes + self.values.nbytes)

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            target = self.target
            if not isinstance(target, Decode):
                written: tuple[torch.Tensor, torch.Tensor] = self._write_span(key_states, value_states, layer_idx)
                return written
            # A decode step's write is traced into the compiled layer's graph (its rows and lengths are tensors, its
            # span one of a few buckets): one graph a layer, the writes fused with the kernels around them. Indexed
            # by tensors only, so that inductor writes into the cache in place; an int index (`keys[layer_idx]`)
            # made it copy the layer's whole slab and back at every step.
            index = (self.layer_ids[layer_idx], target.rows.view(-1, 1), self.head_ids, target.lengths.view(-1, 1))
            self.keys.index_put_(index, key_states[:, :, 0])
            self.values.index_put_(index, value_states[:, :, 0])
            batch = key_states.shape[0]
            # `select`, not `keys[layer_idx, :batch]`: indexed so, dynamo specialised on the layer (a graph a layer)
            keys, values = self.keys.select(0, layer_idx), self.values.select(0, layer_idx)
            return keys[:batch, :, : target.span], values[:batch, :, : target.span]

        @torch.compiler.disable  # type: ignore[untyped-decorator]  # a prefill's slot and start are ints of every value
        def _write_span(
            self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int
        ) -> tuple[torch.Tensor, torch.Tensor]:
            """A prefill's or an extend step's write, uncompiled: compiled, each slot and start would be a graph."""
            keys, values, target = self.keys[layer_idx], self.values[layer_idx], self.target
            if isinstance(target, RideAlong):
                # The rows in use and the new one, whole: the prefill's K and V at [slot, :, :new], each decoding
                # row's at [row, :, :span] (`_ride_along_attention`). Whole, so that no stride of what the layer's
                # compiled code passes on depends on a size (cut to a span, the strides did: each span compiled apart).
                new = key_states.shape[2] - target.rows.shape[0]
                for stored, states in ((keys, key_states[0]), (values, value_states[0])):
                    stored[target.slot, :, :new] = states[:, :new]
                    stored[target.rows, :, target.lengths] = states[:, new:].transpose(0, 1)
                return keys[: target.slot + 1], values[: target.slot + 1]
            if isinstance(target, Extend):
                rows = target.rows.expand(target.count)
                written = target.start + self.offsets[: target.count]
                keys[rows, :, written] = key_states[0].transpose(0, 1)
                values[rows, :, written] = value_states[0].transpose(0, 1)
                return (
                    keys.index_select(0, target.rows)[:, :, : target.span],
                    values.index_select(0, target.rows)[:, :, : target.span],
                )
            if isinstance(target, Padded):
                new = key_states.shape[2]
                keys[:, :, :new].index_copy_(0, target.rows, key_states)
                values[:, :, :new].index_copy_(0, target.rows, value_states)
                return key_states, value_states
            assert isinstance(target, Prefill)
            end = target.start + key_states.shape[2]
            keys[target.slot, :, target.start : end] = key_states[0]
            values[target.slot, :, target.start : end] = value_states[0]
            row = slice(target.slot, target.slot + 1)
            return keys[row, :, :end], values[row, :, :end]

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return 0  # positions are always passed explicitly; nothing asks

        def move(self, source: int, destination: int, length: int) -> None:
            """Copy a slot's first `length` tokens to another slot (the engine keeps the rows in use first)."""
            self.keys[:, destination, :, :length].copy_(self.keys[:, source, :, :length])
            self.values[:, destination, :, :length].copy_(self.values[:, source, :, :length])

    return SlotCache


def slot_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    slot_step: SlotStep | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over the slots (module docstring); outputs (batch, query length, heads, head dim)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if slot_step is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = scaling or query.shape[-1] ** -0.5
    if slot_step.riding:
        assert attention_mask is not None  # the decoding rows' mask
        riding: torch.Tensor = torch.ops.batch_engine.ride_along_attention(
            query, key, value, attention_mask, float(scale), slot_step.kernel
        )
        return riding, None
    if slot_step.kernel and query.shape[2] == 1:
        from batch_engine.decode_attention import decode_attention

        assert attention_mask is not None  # a decode step is always masked
        return decode_attention(query, key, value, attention_mask, scale), None
    if slot_step.grouped:
        return _grouped_attention(query, key, value, attention_mask, scale), None
    if slot_step.causal and slot_step.positions_outer:  # a prefill from position 0 (no mask), for cuDNN's plans
        return torch.ops.batch_engine.causal_attention(query, key, value, float(scale)), None
    mask = None if slot_step.causal else attention_mask
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=slot_step.causal, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def _ride_along_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float, kernel: bool
) -> torch.Tensor:
    """A `RideAlong` step's attention, (1, new + rows, heads, dim): the prompt's queries causally over the prefilled
    row's K and V, then each decoding row's one query as a decode step's (`kernel` or grouped). What is whose comes
    from the shapes: `mask` is (rows, 1, 1, span), the new row is the one after them, `key` holds both.

    It is one operator to `torch.compile`, `batch_engine::ride_along_attention` (`register_attention`): it adds no
    graph break (a prefill's layer breaks only at its KV write, `_write_span`) and nothing of it is traced. Traced
    with the layer, its cuts of the slots by the span and the row count put guards on how the two compare with each
    other and with a slot's length, and a ride along a kind of span or row count that the start had not met compiled
    at request time (seen on an H100: the first loads' prefill steps took up to a second). Kept out of the compiled
    code instead (`torch.compiler.disable`), it broke the layer's graph once more."""
    import torch

    rows, span = mask.shape[0], mask.shape[-1]
    new = query.shape[2] - rows
    # The prompt's queries copied out of the whole, so that their strides depend on the prompt's length only: cuDNN's
    # plans per length key on them, and a view of the whole would be new at each count of riding rows, if only in its
    # batch's stride (which `contiguous` keeps for a batch of one). Positions outer, heads inner, as a layer lays its
    # queries out; K and V too where cuDNN plans per power of two (`batch_engine.attention_plans`).
    prompt_query = query.new_empty((1, new, query.shape[1], query.shape[3])).transpose(1, 2)
    prompt_query.copy_(query[:, :, :new])
    prompt_key, prompt_value = key[rows : rows + 1, :, :new], value[rows : rows + 1, :, :new]
    if planned_on(query.device):
        prompt_key, prompt_value = positions_outer(prompt_key), positions_outer(prompt_value)
    prompt = torch.nn.functional.scaled_dot_product_attention(
        prompt_query, prompt_key, prompt_value, is_causal=True, scale=scale, enable_gqa=True
    ).transpose(1, 2)
    decoding = query[0, :, new:].transpose(0, 1).unsqueeze(2).contiguous()  # (rows, heads, 1, dim)
    keys, values = key[:rows, :, :span], value[:rows, :, :span]
    if kernel:
        from batch_engine.decode_attention import decode_attention

        tokens = decode_attention(decoding, keys, values, mask, scale)
    else:
        tokens = _grouped_attention(decoding, keys, values, mask, scale)
    return torch.cat((prompt, tokens.reshape(1, rows, *tokens.shape[2:])), dim=1)


CHUNK = 128
"""Positions per chunk of a grouped attention's keys: each chunk is its own small matrix product, so that a long span
is read by many blocks at once (one product over the whole span left the device mostly idle at small batches)."""


def _grouped_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Decode and extend attention: each KV head's query heads (and query positions) as rows of one product against
    the stored K and V as they are, split into `CHUNK`-position pieces of the span; (batch, length, heads, dim)."""
    import torch

    batch, heads, length, head_dim = query.shape
    kv_heads, span = key.shape[1], key.shape[2]
    rows = heads // kv_heads * length
    chunks = span // CHUNK if span % CHUNK == 0 else 1
    size = span // chunks
    grouped = query.reshape(batch, kv_heads, 1, rows, head_dim)
    keys = key.view(batch, kv_heads, chunks, size, head_dim)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * scale  # (batch, kv, chunks, rows, size)
    scores = scores.permute(0, 1, 3, 2, 4).reshape(batch, kv_heads, heads // kv_heads, length, span)
    if mask is not None:  # (batch, 1, length, span): the same for every head
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    probs = scores.softmax(-1).to(value.dtype).view(batch, kv_heads, rows, chunks, size).transpose(2, 3)
    out = torch.matmul(probs, value.view(batch, kv_heads, chunks, size, head_dim)).sum(2)  # (batch, kv, rows, dim)
    return out.view(batch, heads, length, head_dim).transpose(1, 2)


def _causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """A prefill from position 0 where cuDNN plans per power of two, (1, length, heads, dim): its tensors as that
    needs them, or as they are once the call recurs (`attention_plans.arranged`). An operator,
    `batch_engine::causal_attention`, so that the choice is made at each call, not once where the layer compiles."""
    import torch

    query, key, value = arranged(query, key, value, causal=True, scale=scale, gqa=True)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scale, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous()


@functools.cache
def _define_operators() -> None:
    """Define `batch_engine::ride_along_attention` and `batch_engine::causal_attention` once (a second definition
    of a name fails)."""
    define_operator(
        "ride_along_attention",
        "(Tensor query, Tensor key, Tensor value, Tensor mask, float scale, bool kernel) -> Tensor",
        _ride_along_attention,
        _transposed,
    )
    define_operator(
        "causal_attention", "(Tensor query, Tensor key, Tensor value, float scale) -> Tensor", _causal_attention,
        _transposed,
    )  # fmt: skip


def _transposed(query: torch.Tensor, *_: Any) -> tuple[int, ...]:
    """The operators' output size: (batch, length, heads, dim) for a query of (batch, heads, length, dim)."""
    return (query.shape[0], query.shape[2], query.shape[1], query.shape[3])


def register_attention() -> None:
    """Register `slot_attention` (and sdpa's mask for plain `generate`) under `ATTENTION`, and define the engine's
    operators (`_define_operators`); idempotent."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    _define_operators()
    AttentionInterface.register(ATTENTION, slot_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
