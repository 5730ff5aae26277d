"""The device side of the batching engine (`batch_engine.engine`): the model's steps over the slots.

`DeviceSteps` owns everything on the device: the slot KV cache (`batch_engine.slots`), one row of small buffers per
slot (the next input token, the length, the M-RoPE delta, the tokens seen for a repetition penalty), the CUDA
graphs, and the stores of prompt prefixes and encoder output (`batch_engine.stores`). It runs three kinds of step,
each a forward of the transformers text model (its code unchanged; its q/k/v projections fused,
`batch_engine.projections`) with the slot cache and the engine's attention:

- `prefill`: a request's prompt into its row: the vision encoder (or its stored output) for an image (replayed as a
  CUDA graph of its grid where the prefills replay theirs, `batch_engine.encoder_graphs`), then the prompt from
  position 0, padded to its length bucket and replayed as that bucket's CUDA graph
  (`EngineSettings.prefill_graphs`), or as it is, the rows before it decoding one token each in the same forward when
  the engine asks (`RideAlong`); or, after a prefix found in the store, only the text after it, as an `extend` step
  of a few bucketed lengths, graph-captured like decode steps;
- `launch`: one decode step, a greedy token for every row in use, as one CUDA graph per (batch, span) bucket; on a
  GPU only queued, its tokens read later (the engine launches the next step first);
- greedy choice on the device, under the checkpoint's `suppress_tokens` and `repetition_penalty`, as `generate`
  (`batch_engine.greedy`).

Rows in use are always the first ones; `move` copies a row into a freed one.

Positions are held as (axes, tokens): three axes for a model with M-RoPE (it has a `get_rope_index`, as
GLM-4.6V-Flash), one for a text model's plain positions; `_position_ids` gives each its own shape.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from batch_engine import decode_attention, graphs, skinny_linear, triton_kernels
from batch_engine.attention_plans import planned_on
from batch_engine.compiling import compile_model
from batch_engine.convolutions import products_for_convolutions
from batch_engine.encoder_graphs import EncoderGraphs
from batch_engine.graphs import BATCH_BUCKETS, EXTEND_BUCKETS, SPAN_BUCKETS, padded_length
from batch_engine.greedy import GreedyChoice
from batch_engine.images import place_images
from batch_engine.projections import fuse_projections
from batch_engine.prompts import Prompt
from batch_engine.slots import (
    ATTENTION,
    Decode,
    Extend,
    Padded,
    Prefill,
    RideAlong,
    SlotStep,
    cache_class,
)
from batch_engine.stores import ByteBoundStore, PrefixStore, StoredKV
from batch_engine.vision_attention import register_vision_attention

if TYPE_CHECKING:
    from batch_engine.settings import EngineSettings

log = logging.getLogger("batch_engine")


class DeviceSteps:
    """The model's steps over the slots (module docstring); only the engine's thread calls it."""

    def __init__(self, model: Any, settings: EngineSettings) -> None:
        import torch

        from batch_engine.slots import register_attention

        register_attention()
        self.model = model
        self.settings = settings
        text = model.config.get_text_config()
        self.text = getattr(model.model, "language_model", model.model)
        """The decoder: a multimodal model's language model, or a causal LM's own."""
        self.axes = 3 if hasattr(model.model, "get_rope_index") else 1
        """Position axes: 3 for M-RoPE, 1 for plain positions."""
        self.text.config._attn_implementation = ATTENTION  # sdpa unless the engine's keyword is passed
        self.packed_vision = register_vision_attention(model)
        """Whether the vision encoder attends through `batch_engine.vision_attention` (an image model's only)."""
        products_for_convolutions(model)
        self.device = model.device
        self.plans_by_power_of_two = planned_on(self.device)
        """Whether cuDNN's attention plans per power of two: a prefill then lays out its tensors as that needs."""
        if settings.fuse_projections:
            fuse_projections(self.text)
        self.dependent_launch = triton_kernels.dependent_launch(settings.dependent_launch, self.device)
        """Whether kernels launch with programmatic dependent launch (`dependent_launch`; before the kernels' checks,
        so that they run as the steps will)."""
        self.linear_kernel = triton_kernels.wanted(
            settings.linear_kernel, "the Triton linear kernel", self.device,
            lambda: skinny_linear.works_on(self.device, model.dtype),
        )  # fmt: skip
        """Whether decode steps' linear layers run through the Triton kernel (`linear_kernel`)."""
        if self.linear_kernel:
            skinny_linear.load()
            skinny_linear.use_kernel(self.text)
        self.compiled = bool(settings.compile or (settings.compile is None and self.device.type == "cuda"))
        """Whether the model's layers are compiled (`compile_model`)."""
        if self.compiled:
            compile_model(model, self.text, settings.compile_shapes, dependent_launch=self.dependent_launch)
        self.image_end_id: int | None = getattr(model.config, "image_end_token_id", None)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        heads = (text.num_attention_heads, text.num_key_value_heads, head_dim)
        kernel = triton_kernels.wanted(
            settings.decode_kernel, "the Triton decode attention", self.device,
            lambda: decode_attention.works_on(self.device, model.dtype, *heads),
        )  # fmt: skip
        if kernel:
            decode_attention.load()
        self.decode_step = SlotStep(causal=False, grouped=True, kernel=kernel)
        """The `slot_step` of decode steps: the Triton decode attention (`decode_kernel`), or the grouped one."""
        self.capacity = -(-settings.max_tokens // 256) * 256
        """Positions per slot: `max_tokens` rounded up, so that every span splits into whole attention chunks."""
        self.cache = cache_class()(
            layers=text.num_hidden_layers,
            slots=settings.slots,
            max_tokens=self.capacity,
            kv_heads=text.num_key_value_heads,
            head_dim=head_dim,
            dtype=model.dtype,
            device=self.device,
        )
        log.info(
            "batching engine: %d slots of %d positions on %s, %.2f GB of KV cache (%.1f KB a token)",
            settings.slots, self.capacity, self.device, self.cache.nbytes / 1e9,
            self.cache.nbytes / settings.slots / self.capacity / 1e3,
        )  # fmt: skip
        slots, device = settings.slots, self.device
        self._choose = GreedyChoice(model.generation_config, slots, text.vocab_size, device)
        """Greedy choice as `generate` makes it, and each slot's tokens seen for a repetition penalty."""
        self._input_ids = torch.zeros((slots, 1), dtype=torch.long, device=device)
        self._next_ids = torch.zeros(slots, dtype=torch.long, device=device)
        self._lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self._deltas = torch.zeros(slots, dtype=torch.long, device=device)
        self._active = torch.zeros(slots, dtype=torch.long, device=device)
        self._rows_index = torch.arange(slots, device=device)
        self._positions = torch.arange(self.capacity, device=device)
        longest = EXTEND_BUCKETS[-1]
        self._extend_ids = torch.zeros(longest, dtype=torch.long, device=device)
        self._extend_positions = torch.zeros((self.axes, longest), dtype=torch.long, device=device)
        self._extend_start, self._row, self._last, self._token = (
            torch.zeros(1, dtype=torch.long, device=device) for _ in range(4)
        )
        """An extend step's start; an extend or padded prefill step's row, last new token's index and its token."""
        self.padded = bool(settings.prefill_graphs)
        """Whether prefills from position 0 are padded to their length bucket (`padded_length`) and, on a GPU,
        replay a CUDA graph of that bucket (`EngineSettings.prefill_graphs`)."""
        padded = self.capacity if self.padded else 0  # the padded steps' input, which their graphs read
        self._embeds = torch.zeros((padded, text.hidden_size), dtype=model.dtype, device=device)
        self._padded_positions = torch.zeros((self.axes, padded), dtype=torch.long, device=device)
        self.prefixes = PrefixStore(settings.prefix_bytes)
        self.encoder = ByteBoundStore(settings.encoder_bytes)
        visual = getattr(model.model, "visual", None)
        captures = self.padded and visual is not None and self.device.type == "cuda" and settings.cuda_graphs
        self.encoder_graphs = EncoderGraphs(visual, self.device) if captures else None
        """The vision encoder as a CUDA graph per image grid met twice (`batch_engine.encoder_graphs`), where the
        prefills replay theirs; replayed while `padded`."""
        self.graphs: dict[tuple[Any, ...], Any] = {}
        self._host_ids: list[Any] | None = None
        """On a GPU, pinned host buffers the launched steps' tokens are copied into (`launch`)."""
        self._copied: list[Any] = []
        """On a GPU, the events that mark each buffer's copy done."""
        self._launches = 0
        if self.device.type == "cuda":
            self._host_ids = [torch.zeros(slots, dtype=torch.long, pin_memory=True) for _ in range(2)]
            self._copied = [torch.cuda.Event() for _ in range(2)]  # type: ignore[no-untyped-call]

    def prefill(self, prompt: Prompt, row: int, stored: StoredKV | None, longest: int = 0) -> int:
        """`prompt` into `row` (after the `stored` prefix, when one was found); its first token. With `longest` (a
        prefill from position 0 only: `rides`), the rows before `row`, the longest of which holds `longest` tokens,
        decode one token each in the same forward, as a launched decode step would (`tokens` gives them)."""
        device, start = self.device, 0
        if stored is not None:
            self.cache.keys[:, row, :, : stored.tokens].copy_(stored.keys)
            self.cache.values[:, row, :, : stored.tokens].copy_(stored.values)
            start = stored.tokens
        ids = prompt.ids.to(device, non_blocking=True)  # small, from pageable memory: staged, not waiting on the device
        self._choose.start(row, ids)
        total = prompt.tokens
        count = next((size for size in EXTEND_BUCKETS if size >= total - start), 0)
        if start and count and start + count <= self.capacity:
            token = self._extend(prompt, row, start, count)
        else:
            # before the encoder is queued: a copy from pageable memory over 64 KB (some 2,700 positions) may wait
            # for the work queued before it
            positions = prompt.positions[:, start:].to(device, non_blocking=True)
            embeds = self.text.embed_tokens(ids[start:])
            padded = self.padded and not (start or longest)
            if padded:  # into the padded step's own buffer, which its graphs read
                embeds = self._embeds[:total].copy_(embeds)
            if start == 0 and prompt.pixel_values is not None:
                place_images(embeds, prompt, self.model, self.encoder, self.encoder_graphs if self.padded else None)
            if padded:
                token = self._padded(positions, row, total)
            elif longest:
                token = self._ride_along(embeds, positions, row, longest)
            else:
                mask = self._positions[:total].view(1, total) <= self._positions[start:total].view(-1, 1)
                self.cache.target = Prefill(row, start)
                hidden = self.text(
                    inputs_embeds=embeds[None],
                    position_ids=self._position_ids(positions[:, None]),
                    attention_mask=mask.view(1, 1, total - start, total),
                    past_key_values=self.cache,
                    use_cache=True,
                    slot_step=SlotStep(causal=start == 0, positions_outer=self.plans_by_power_of_two),
                ).last_hidden_state
                token = int(self._choose(self.model.lm_head(hidden[:, -1]), self._rows_index[row : row + 1])[0])
        self.prefixes.keep_longest(prompt, self.cache, row, stored)
        self._input_ids[row, 0] = token
        self._lengths[row] = total
        self._deltas[row] = prompt.delta
        self._active[row] = 1
        return token

    @staticmethod
    def rides(stored: StoredKV | None) -> bool:
        """Whether a prefill after `stored` can take the decoding rows into its forward (`prefill`'s `longest`): one
        from position 0 (a follow-up's text after a reused prefix is an extend step, a graph of its own)."""
        return stored is None

    def _ride_along(self, embeds: Any, positions: Any, row: int, longest: int) -> int:
        """A prompt's prefill into `row` (its `embeds` and `positions`, from position 0) with rows [0, `row`) each
        decoding one token in the same forward (`slots.RideAlong`); the prompt's first token."""
        import torch

        span = self._span(longest + 1)
        lengths = self._lengths[:row]
        decoding = (lengths + self._deltas[:row]).view(1, row).expand(self.axes, row)
        mask = self._positions[:span].view(1, span) <= lengths.view(row, 1)
        self.cache.target = RideAlong(row, self._rows_index[:row], lengths, span)
        hidden = self.text(
            inputs_embeds=torch.cat((embeds, self.text.embed_tokens(self._input_ids[:row, 0])))[None],
            position_ids=self._position_ids(torch.cat((positions, decoding), dim=1)[:, None]),
            attention_mask=mask.view(row, 1, 1, span),
            past_key_values=self.cache,
            use_cache=True,
            slot_step=SlotStep(causal=True, kernel=self.decode_step.kernel, riding=True),
        ).last_hidden_state
        # the prompt's last position, then one a decoding row, in the order of `row` and rows [0, row)
        order = torch.cat((self._rows_index[row : row + 1], self._rows_index[:row]))
        chosen = self._choose(self.model.lm_head(hidden[0, -row - 1 :]), order)
        self._next_ids[:row].copy_(chosen[1:])
        self._input_ids[:row, 0].copy_(chosen[1:])
        lengths.add_(self._active[:row])
        return int(chosen[0])

    def launch(self, batch: int, longest: int) -> Callable[[], list[int]]:
        """One decode step: a token for each of the first `batch` rows, the longest of which holds `longest` tokens.
        On a GPU the step is only queued: the returned call waits for it and gives its tokens, and the next step may
        be launched before that (the steps read their inputs on the device, where each leaves them for the next)."""
        bucket = min(next(size for size in (*BATCH_BUCKETS, self.settings.slots) if size >= batch), self.settings.slots)
        span = self._span(longest + 1)
        graph = self.graphs.get((bucket, span))
        if graph is not None:
            graph.replay()
        else:
            self._decode_step(bucket, span)
        return self.tokens(batch)

    def tokens(self, batch: int) -> Callable[[], list[int]]:
        """The call that gives the tokens the last step decoded for the first `batch` rows (`launch`)."""
        if self._host_ids is None:
            tokens = self._next_ids[:batch].tolist()
            return lambda: tokens
        # Two launched steps at most are unread (the engine reads one after launching the next): two buffers.
        host, done = self._host_ids[self._launches % 2], self._copied[self._launches % 2]
        self._launches += 1
        host[:batch].copy_(self._next_ids[:batch], non_blocking=True)
        done.record()
        return functools.partial(_read, host, batch, done)

    def move(self, source: int, destination: int, length: int) -> None:
        """Row `source` (holding `length` tokens) into row `destination`; `source` is then free."""
        self.cache.move(source, destination, length)
        for buffer in (self._input_ids, self._lengths, self._deltas, self._choose.seen):
            buffer[destination] = buffer[source]
        self.release(source)

    def release(self, row: int) -> None:
        self._active[row] = 0
        self._lengths[row] = 0

    def reset(self) -> None:
        """Every row free (after a failed step)."""
        self._active.zero_()
        self._lengths.zero_()

    def _extend(self, prompt: Prompt, row: int, start: int, count: int) -> int:
        """A follow-up's own text after its reused prefix, through the step for `count` new tokens (padded; the
        padding's K and V land past the prompt, masked until decoding overwrites them): a CUDA graph when one was
        captured for (`count`, span)."""
        total = prompt.tokens
        new = total - start
        self._extend_ids.zero_()
        self._extend_ids[:new] = prompt.ids[start:].to(self.device)
        _pad_positions(self._extend_positions, prompt.positions[:, start:].to(self.device), count)
        self._row.fill_(row)
        self._extend_start.fill_(start)
        self._last.fill_(new - 1)
        span = self._span(start + count)
        return self._one_row(("extend", count, span), functools.partial(self._extend_step, count, span))

    def padded_lengths(self) -> list[int]:
        """The lengths a prefill from position 0 is padded to (`padded_length`, at most the slots' `capacity`)."""
        lengths = [min(padded_length(1), self.capacity)]
        while lengths[-1] < self.capacity:
            lengths.append(min(padded_length(lengths[-1] + 1), self.capacity))
        return lengths

    def _padded(self, positions: Any, row: int, total: int) -> int:
        """A prefill from position 0 of `total` tokens into `row`, their embeddings already in `_embeds`, through the
        step for its length bucket: a CUDA graph when one was captured for it. Padded as an extend step is (the
        padding's K and V land past the prompt, masked until decoding overwrites them); the prompt's causal attention
        never reads the padding."""
        count = min(padded_length(total), self.capacity)
        _pad_positions(self._padded_positions, positions, count)
        self._row.fill_(row)
        self._last.fill_(total - 1)
        return self._one_row(("prefill", count), functools.partial(self._padded_step, count))

    def _one_row(self, key: tuple[Any, ...], step: Callable[[], None]) -> int:
        """One row's step (its inputs in place): the graph captured under `key`, else `step` run as it is; the token
        it chose."""
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
        else:
            step()
        return int(self._token.item())

    def clear_row_inputs(self) -> None:
        """The one-row steps' inputs zeroed (row, start, last new token's index): any captured graph replayed then
        reads within its bounds (a padded prefill leaves the last index up to the slot's length, past an extend
        step's tokens)."""
        for buffer in (self._row, self._extend_start, self._last):
            buffer.zero_()

    def _padded_step(self, count: int) -> None:
        mask = self._positions[:count].view(1, count) <= self._positions[:count].view(-1, 1)
        self.cache.target = Padded(self._row)
        hidden = self.text(
            inputs_embeds=self._embeds[None, :count],
            position_ids=self._position_ids(self._padded_positions[:, None, :count]),
            attention_mask=mask.view(1, 1, count, count),
            past_key_values=self.cache,
            use_cache=True,
            slot_step=SlotStep(causal=True, positions_outer=self.plans_by_power_of_two),
        ).last_hidden_state
        last = hidden[0].index_select(0, self._last)
        self._token.copy_(self._choose(self.model.lm_head(last), self._row))

    def _extend_step(self, count: int, span: int) -> None:
        written = self._extend_start + self._positions[:count]
        mask = self._positions[:span].view(1, span) <= written.view(count, 1)
        self.cache.target = Extend(self._row, self._extend_start, count, span)
        hidden = self.text(
            inputs_embeds=self.text.embed_tokens(self._extend_ids[:count])[None],
            position_ids=self._position_ids(self._extend_positions[:, None, :count]),
            attention_mask=mask.view(1, 1, count, span),
            past_key_values=self.cache,
            use_cache=True,
            slot_step=SlotStep(causal=False, grouped=True),
        ).last_hidden_state
        last = hidden[0].index_select(0, self._last)
        self._token.copy_(self._choose(self.model.lm_head(last), self._row))

    def _position_ids(self, positions: Any) -> Any:
        """(axes, batch, tokens) positions as the model takes them: all three axes for M-RoPE, else (batch, tokens)."""
        return positions if self.axes == 3 else positions[0]

    def _span(self, longest: int) -> int:
        """The span bucket holding `longest` positions."""
        return min(next((size for size in SPAN_BUCKETS if size >= longest), self.capacity), self.capacity)

    def _decode_step(self, bucket: int, span: int) -> None:
        """One greedy token for rows [0, bucket) (rows past the requests in use compute and are ignored)."""
        lengths = self._lengths[:bucket]
        positions = (lengths + self._deltas[:bucket]).view(1, bucket, 1).expand(self.axes, bucket, 1)
        mask = self._positions[:span].view(1, span) <= lengths.view(bucket, 1)
        self.cache.target = Decode(self._rows_index[:bucket], lengths, span)
        hidden = self.text(
            inputs_embeds=self.text.embed_tokens(self._input_ids[:bucket]),
            position_ids=self._position_ids(positions),
            attention_mask=mask.view(bucket, 1, 1, span),
            past_key_values=self.cache,
            use_cache=True,
            slot_step=self.decode_step,
        ).last_hidden_state
        chosen = self._choose(self.model.lm_head(hidden[:, -1]), self._rows_index[:bucket])
        self._next_ids[:bucket].copy_(chosen)
        self._input_ids[:bucket, 0].copy_(chosen)
        lengths.add_(self._active[:bucket])

    def capture(self) -> None:
        """The decode, extend and padded prefill steps' CUDA graphs (`batch_engine.graphs`)."""
        graphs.capture(self, self._decode_step, self._extend_step, self._padded_step)


def _pad_positions(buffer: Any, positions: Any, count: int) -> None:
    """A one-row step's `positions` (axes, new tokens; on the device) into the first of `buffer`'s, and one past the
    last for the padding up to `count`."""
    new = positions.shape[1]
    buffer[:, :new] = positions
    buffer[:, new:count] = positions[:, -1:] + 1


def _read(host: Any, batch: int, done: Any) -> list[int]:
    """A launched step's tokens, once the device has copied them to `host`."""
    done.synchronize()
    return host[:batch].tolist()  # type: ignore[no-any-return]
