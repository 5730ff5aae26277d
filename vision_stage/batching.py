"""The batching engine: GLM-4.6V generation for many requests at once on one device, over the unchanged
transformers model.

One thread owns the model. Requests come through a bounded queue (`submit`; a full queue is `VisionUnavailable`
with a retry hint) as the processor's output, prepared off that thread, with their M-RoPE positions already
computed by the model's own `get_rope_index` (once per request; decode positions are then length + delta, passed
explicitly: the model's shared `rope_deltas` is never used). Each `step` of the thread:

1. admits waiting requests into free slots, under a prefill token budget and at most one image prefill per step
   (an image's prompt is never split): each admitted request is prefilled on its own and yields its first token;
2. runs one decode step for every request in a slot, the new ones included: greedy, one token each, on the device,
   as one CUDA graph per (batch, span) bucket when the device is a GPU;
3. hands finished requests their tokens (a stop token, the token budget, or a loop: `stage_protocol.loops`) and
   moves the last slot into each freed one, so the slots in use stay first.

Reuse: the vision encoder's output is kept per image (`EncoderStore`), and so is the KV of the prompt up to the
image's end token (`PrefixStore`), both keyed by the decoded image's content hash with the prefix's token ids: a
follow-up question on the same image (a session, a probe, a re-ask, another task with the same prefix) prefills
only its own text. Storage and attention are in `vision_stage.slots`.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from stage_protocol.loops import WINDOW, repeats_at_end
from vision_stage.errors import VisionRejected, VisionUnavailable
from vision_stage.slots import ATTENTION, ByteBoundStore, Decode, Extend, Prefill, SlotStep, StoredKV, cache_class

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
EXTEND_BUCKETS = (16, 32, 64, 128)
"""New-token counts of a follow-up's prefill (after a reused image prefix), each a CUDA graph like a decode step."""
SPAN_BUCKETS = tuple(2**n for n in range(8, 18))  # 256 … 131,072 positions


@dataclass(frozen=True)
class EngineSettings:
    slots: int = 16
    """Requests decoded together at most."""
    max_tokens: int = 8192
    """Prompt plus answer per request at most (each slot's length)."""
    queue_size: int = 64
    """Requests waiting for a slot at most; beyond that `submit` refuses."""
    prefill_tokens: int = 8192
    """Prompt tokens prefilled per step at most (one request is always admitted, however long)."""
    prefix_bytes: int = 4 << 30
    """Bytes of image-prefix KV kept for follow-up questions."""
    encoder_bytes: int = 512 << 20
    """Bytes of vision-encoder output kept."""
    cuda_graphs: bool = True
    """Capture decode steps as CUDA graphs (on a CUDA device only)."""
    stop_loops: bool = True
    """End an answer once it loops (`stage_protocol.loops`), as the `glm` backend's plain `generate` does."""
    compile: bool | None = None
    """`torch.compile` the text model's decoder layers (dynamic shapes; one compilation serves every layer): fuses
    the many small kernels of a decode step, at about a minute more to start on a GPU. None: on a CUDA device."""

    def __post_init__(self) -> None:
        bounds = (
            ("slots", self.slots, 1, 128),
            ("max_tokens", self.max_tokens, 256, None),
            ("queue_size", self.queue_size, 1, None),
            ("prefill_tokens", self.prefill_tokens, 1, None),
            ("prefix_bytes", self.prefix_bytes, 0, None),
            ("encoder_bytes", self.encoder_bytes, 0, None),
        )
        for name, value, low, high in bounds:
            if value < low or (high is not None and value > high):
                within = f"from {low} to {high}" if high is not None else f"at least {low}"
                raise ValueError(f"the batching engine's {name} must be {within}, not {value}")


@dataclass(frozen=True)
class Completion:
    """What one request generated, and how it went."""

    ids: list[int]
    """The new token ids, a final stop token included."""
    prompt_tokens: int
    reused_tokens: int
    """Prompt tokens whose KV came from the prefix store (not prefilled)."""
    queue_ms: float
    first_token_ms: float
    """From `submit` to the first token."""
    looped: bool


@dataclass(frozen=True)
class EngineStats:
    """What the engine has done: decode steps and their mean batch size, requests admitted and their mean wait for
    a slot, and lookups of the image-prefix and encoder stores."""

    running: int
    waiting: int
    steps: int
    mean_batch: float
    admitted: int
    mean_queue_ms: float
    prefix_hits: int
    prefix_misses: int
    encoder_hits: int


@dataclass(eq=False)
class _Request:
    ids: Any
    """The prompt's token ids, (prompt tokens,) on the CPU."""
    positions: Any
    """M-RoPE positions, (3, prompt tokens), on the CPU."""
    delta: int
    pixel_values: Any
    grid: Any
    image_key: bytes | None
    budget: int
    future: Future[Completion]
    submitted: float = field(default_factory=time.perf_counter)
    tokens: list[int] = field(default_factory=list)
    length: int = 0
    reused: int = 0
    admitted: float = 0.0
    first_token: float = 0.0

    @property
    def prompt_tokens(self) -> int:
        return int(self.ids.shape[0])


class BatchEngine:
    """Continuous batching over a `Glm4vForConditionalGeneration` (module docstring). `start` runs `step` on its
    own thread; tests and benchmarks may instead call `step` themselves, from one thread."""

    def __init__(self, model: Any, settings: EngineSettings) -> None:
        import torch

        from vision_stage.slots import register_attention

        register_attention()
        self.model = model
        self.settings = settings
        text = model.config.get_text_config()
        self.text = model.model.language_model
        self.text.config._attn_implementation = ATTENTION  # sdpa unless the engine's keyword is passed
        self.device = model.device
        if settings.compile or (settings.compile is None and self.device.type == "cuda"):
            # One compilation for all layers: their index is an input, not a constant to specialise on.
            torch._dynamo.config.allow_unspec_int_on_nn_module = True
            for layer in self.text.layers:
                layer.compile(dynamic=True)
        self.image_token_id = int(model.config.image_token_id)
        self.image_end_id = int(model.config.image_end_token_id)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
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
        generation = model.generation_config
        self.stop_ids = frozenset(stop_ids_of(generation))
        slots, device = settings.slots, self.device
        vocab = text.vocab_size
        self._suppressed = torch.zeros(vocab, dtype=torch.bool, device=device)
        self._suppressed[list(generation.suppress_tokens or [])] = True
        self._penalty = float(generation.repetition_penalty or 1.0)
        self._seen = torch.zeros(
            (slots, vocab) if self._penalty != 1.0 else (slots, 1), dtype=torch.bool, device=device
        )
        self._input_ids = torch.zeros((slots, 1), dtype=torch.long, device=device)
        self._next_ids = torch.zeros(slots, dtype=torch.long, device=device)
        self._lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self._deltas = torch.zeros(slots, dtype=torch.long, device=device)
        self._active = torch.zeros(slots, dtype=torch.long, device=device)
        self._rows_index = torch.arange(slots, device=device)
        self._positions = torch.arange(self.capacity, device=device)
        longest = EXTEND_BUCKETS[-1]
        self._extend_ids = torch.zeros(longest, dtype=torch.long, device=device)
        self._extend_positions = torch.zeros((3, longest), dtype=torch.long, device=device)
        self._extend_row = torch.zeros(1, dtype=torch.long, device=device)
        self._extend_start = torch.zeros(1, dtype=torch.long, device=device)
        self._extend_last = torch.zeros(1, dtype=torch.long, device=device)
        self._extend_token = torch.zeros(1, dtype=torch.long, device=device)
        self.prefixes = ByteBoundStore(settings.prefix_bytes)
        self.encoder = ByteBoundStore(settings.encoder_bytes)
        self._queue: queue.Queue[_Request] = queue.Queue(maxsize=settings.queue_size)
        self._held: _Request | None = None
        self._rows: list[_Request] = []
        self._graphs: dict[tuple[Any, ...], Any] = {}
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self._wake = threading.Event()
        self.steps = 0
        self.batch_sizes: deque[int] = deque(maxlen=4096)
        """The decode batch size of the latest steps."""
        self._decoded = 0
        self._admitted = 0
        self._queue_ms = 0.0

    # --- the caller's side ----------------------------------------------------------------------------------------

    def submit(self, inputs: Mapping[str, Any], *, image_key: str | None, max_new_tokens: int) -> Future[Completion]:
        """Queue one prompt (the processor's output for one image); its M-RoPE positions are computed here, on the
        caller's thread. `VisionRejected` when the prompt leaves no room in a slot, `VisionUnavailable` when the
        queue is full or the engine is closed."""
        if self._closed.is_set():
            raise VisionUnavailable("the glm batching engine is closed")
        ids = inputs["input_ids"][0]
        room = self.settings.max_tokens - int(ids.shape[0])
        if room < 1:
            raise VisionRejected(
                f"the prompt is {int(ids.shape[0])} tokens but a slot of the glm engine holds at most "
                f"{self.settings.max_tokens} (ORCH_VISION__ENGINE_MAX_TOKENS)"
            )
        positions, delta = self.model.model.get_rope_index(
            inputs["input_ids"],
            inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
            attention_mask=None,
        )
        request = _Request(
            ids=ids,
            positions=positions[:, 0],
            delta=int(delta.reshape(-1)[0]),
            pixel_values=inputs.get("pixel_values"),
            grid=inputs.get("image_grid_thw"),
            image_key=image_key.encode() if image_key else None,
            budget=min(max_new_tokens, room),
            future=Future(),
        )
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise VisionUnavailable(
                f"the glm engine has {self.settings.queue_size} requests waiting already", retry_after_s=1.0
            ) from None
        self._wake.set()
        return request.future

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + (self._held is not None)

    @property
    def running(self) -> int:
        return len(self._rows)

    def stats(self) -> EngineStats:
        """Counters since the engine started (read from any thread; each figure is read once, not as one snapshot)."""
        steps = self.steps
        return EngineStats(
            running=self.running,
            waiting=self.waiting,
            steps=steps,
            mean_batch=self._decoded / steps if steps else 0.0,
            admitted=self._admitted,
            mean_queue_ms=self._queue_ms / self._admitted if self._admitted else 0.0,
            prefix_hits=self.prefixes.hits,
            prefix_misses=self.prefixes.misses,
            encoder_hits=self.encoder.hits,
        )

    def start(self) -> None:
        """Capture the decode graphs (on a GPU) and run `step` on the engine's own thread until `close`."""
        self.capture()
        self._thread = threading.Thread(target=self._run, name="glm-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread after its current step; requests still waiting or running fail with
        `VisionUnavailable`."""
        self._closed.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        closed = VisionUnavailable("the glm batching engine was closed")
        for request in [*self._rows, *([self._held] if self._held else []), *_drain(self._queue)]:
            if not request.future.done():
                request.future.set_exception(closed)
        self._rows, self._held = [], None

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while not self._closed.is_set():
                try:
                    worked = self.step()
                except Exception as exc:  # the model failed: fail what it was doing, keep serving
                    log.exception("glm engine step failed")
                    self._fail_all(exc)
                    worked = True
                if not worked:
                    self._wake.wait(0.05)
                    self._wake.clear()

    # --- the engine's thread --------------------------------------------------------------------------------------

    def step(self) -> bool:
        """Admit, prefill, decode once, finish (module docstring); whether there was anything to do."""
        import torch

        with torch.inference_mode():
            admitted = self._admit()
            if not self._rows:
                return admitted
            self._decode()
            self.steps += 1
            return True

    def run_until_idle(self) -> None:
        """Step until nothing waits or runs (tests and benchmarks, on their own thread)."""
        while self.step():
            pass

    def _admit(self) -> bool:
        spent, image_prefilled, admitted = 0, False, False
        while len(self._rows) < self.settings.slots:
            request, self._held = self._held, None
            if request is None:
                request = _take(self._queue)
                if request is None:
                    break
                if not request.future.set_running_or_notify_cancel():
                    continue
            stored = self._stored_prefix(request)
            cost = request.prompt_tokens - (stored.tokens if stored else 0)
            needs_image = stored is None and request.pixel_values is not None
            if admitted and ((needs_image and image_prefilled) or spent + cost > self.settings.prefill_tokens):
                self._held = request
                break
            try:
                self._prefill(request, stored)
            except Exception as exc:  # this request's inputs failed the model: fail it alone
                request.future.set_exception(exc)
                continue
            spent, image_prefilled, admitted = spent + cost, image_prefilled or needs_image, True
        return admitted

    def _prefix_key(self, request: _Request) -> tuple[bytes, int] | None:
        if request.image_key is None:
            return None
        ends = (request.ids == self.image_end_id).nonzero()
        if ends.numel() == 0:
            return None
        length = int(ends[-1, 0]) + 1
        digest = hashlib.sha256(request.image_key)
        digest.update(request.ids[:length].numpy().tobytes())
        digest.update(str(request.grid.tolist()).encode())
        return digest.digest(), length

    def _stored_prefix(self, request: _Request) -> StoredKV | None:
        key = self._prefix_key(request)
        if key is None or key[1] >= request.prompt_tokens:
            return None
        found: StoredKV | None = self.prefixes.lookup(key[0])
        return found

    def _prefill(self, request: _Request, stored: StoredKV | None) -> None:

        request.admitted = time.perf_counter()
        self._admitted += 1
        self._queue_ms += (request.admitted - request.submitted) * 1000
        row, device = len(self._rows), self.device
        start = 0
        if stored is not None:
            self.cache.keys[:, row, :, : stored.tokens].copy_(stored.keys)
            self.cache.values[:, row, :, : stored.tokens].copy_(stored.values)
            start = stored.tokens
        ids = request.ids.to(device)
        self._seen[row] = False
        if self._penalty != 1.0:
            self._seen[row, ids] = True
        total = request.prompt_tokens
        count = next((size for size in EXTEND_BUCKETS if size >= total - start), 0)
        if start and count and start + count <= self.capacity:
            token = self._extend(request, row, start, count)
        else:
            embeds = self.text.embed_tokens(ids[start:])
            if start == 0 and request.pixel_values is not None:
                image = ids == self.image_token_id
                embeds[image] = self._image_embeds(request).to(embeds.dtype)
            mask = self._positions[:total].view(1, total) <= self._positions[start:total].view(-1, 1)
            self.cache.target = Prefill(row, start)
            hidden = self.text(
                inputs_embeds=embeds[None],
                position_ids=request.positions[:, None, start:].to(device),
                attention_mask=mask.view(1, 1, total - start, total),
                past_key_values=self.cache,
                use_cache=True,
                slot_step=SlotStep(causal=start == 0),
            ).last_hidden_state
            token = int(self._choose(self.model.lm_head(hidden[:, -1]), self._rows_index[row : row + 1])[0])
        if stored is None:
            self._keep_prefix(request, row)
        request.reused, request.length = start, total
        self._input_ids[row, 0] = token
        self._lengths[row] = total
        self._deltas[row] = request.delta
        self._active[row] = 1
        self._rows.append(request)
        request.first_token = time.perf_counter()
        self._accept(request, token)

    def _extend(self, request: _Request, row: int, start: int, count: int) -> int:
        """A follow-up's own text after its reused prefix, through the step for `count` new tokens (padded; the
        padding's K and V land past the prompt, masked until decoding overwrites them): a CUDA graph when one was
        captured for (`count`, span)."""
        total = request.prompt_tokens
        new = total - start
        self._extend_ids.zero_()
        self._extend_ids[:new] = request.ids[start:].to(self.device)
        positions = request.positions[:, start:]
        self._extend_positions[:, :new] = positions.to(self.device)
        self._extend_positions[:, new:count] = positions[:, -1:].to(self.device) + 1
        self._extend_row.fill_(row)
        self._extend_start.fill_(start)
        self._extend_last.fill_(new - 1)
        span = self._span(start + count)
        graph = self._graphs.get(("extend", count, span))
        if graph is not None:
            graph.replay()
        else:
            self._extend_step(count, span)
        return int(self._extend_token.item())

    def _extend_step(self, count: int, span: int) -> None:
        written = self._extend_start + self._positions[:count]
        mask = self._positions[:span].view(1, span) <= written.view(count, 1)
        self.cache.target = Extend(self._extend_row, self._extend_start, count, span)
        hidden = self.text(
            inputs_embeds=self.text.embed_tokens(self._extend_ids[:count])[None],
            position_ids=self._extend_positions[:, None, :count],
            attention_mask=mask.view(1, 1, count, span),
            past_key_values=self.cache,
            use_cache=True,
            slot_step=SlotStep(causal=False, grouped=True),
        ).last_hidden_state
        last = hidden[0].index_select(0, self._extend_last)
        self._extend_token.copy_(self._choose(self.model.lm_head(last), self._extend_row))

    def _span(self, longest: int) -> int:
        """The span bucket holding `longest` positions."""
        return min(next((size for size in SPAN_BUCKETS if size >= longest), self.capacity), self.capacity)

    def _image_embeds(self, request: _Request) -> Any:
        import torch

        key = (
            hashlib.sha256(request.image_key + str(request.grid.tolist()).encode()).digest()
            if request.image_key
            else None
        )
        found = self.encoder.lookup(key) if key else None
        if found is not None:
            return found.tensor
        output = self.model.model.get_image_features(
            request.pixel_values.to(self.device), image_grid_thw=request.grid.to(self.device), return_dict=True
        )
        embeds = torch.cat(tuple(output.pooler_output), dim=0)
        if key:
            self.encoder.keep(key, _Tensor(embeds))
        return embeds

    def _keep_prefix(self, request: _Request, row: int) -> None:
        key = self._prefix_key(request)
        if key is None or key[1] >= request.prompt_tokens:
            return
        length = key[1]
        stored = StoredKV(self.cache.keys[:, row, :, :length].clone(), self.cache.values[:, row, :, :length].clone())
        self.prefixes.keep(key[0], stored)

    def _decode(self) -> None:
        batch = len(self._rows)
        bucket = next(size for size in (*BATCH_BUCKETS, self.settings.slots) if size >= batch)
        bucket = min(bucket, self.settings.slots)
        span = self._span(max(request.length for request in self._rows) + 1)
        graph = self._graphs.get((bucket, span))
        if graph is not None:
            graph.replay()
        else:
            self._decode_step(bucket, span)
        self.batch_sizes.append(batch)
        self._decoded += batch
        tokens = self._next_ids[:batch].tolist()
        for request, token in zip(list(self._rows), tokens, strict=True):
            request.length += 1
            self._accept(request, int(token))

    def _decode_step(self, bucket: int, span: int) -> None:
        """One greedy token for rows [0, bucket) (rows past the requests in use compute and are ignored)."""
        lengths = self._lengths[:bucket]
        positions = (lengths + self._deltas[:bucket]).view(1, bucket, 1).expand(3, bucket, 1)
        mask = self._positions[:span].view(1, span) <= lengths.view(bucket, 1)
        self.cache.target = Decode(self._rows_index[:bucket], lengths, span)
        hidden = self.text(
            inputs_embeds=self.text.embed_tokens(self._input_ids[:bucket]),
            position_ids=positions,
            attention_mask=mask.view(bucket, 1, 1, span),
            past_key_values=self.cache,
            use_cache=True,
            slot_step=SlotStep(causal=False, grouped=True),
        ).last_hidden_state
        chosen = self._choose(self.model.lm_head(hidden[:, -1]), self._rows_index[:bucket])
        self._next_ids[:bucket].copy_(chosen)
        self._input_ids[:bucket, 0].copy_(chosen)
        lengths.add_(self._active[:bucket])

    def _choose(self, logits: Any, rows: Any) -> Any:
        """Greedy choice, as `generate` makes it under the checkpoint's `repetition_penalty` (over the prompt and
        the answer so far) and `suppress_tokens`; on the device."""
        import torch

        scores = logits.float()
        if self._penalty != 1.0:
            penalised = torch.where(scores < 0, scores * self._penalty, scores / self._penalty)
            scores = torch.where(self._seen[rows], penalised, scores)
        scores = scores.masked_fill(self._suppressed, float("-inf"))
        chosen = scores.argmax(-1)
        if self._penalty != 1.0:
            self._seen[rows, chosen] = True
        return chosen

    def _accept(self, request: _Request, token: int) -> None:
        request.tokens.append(token)
        looped = self.settings.stop_loops and repeats_at_end(request.tokens[-WINDOW:])
        if token in self.stop_ids or len(request.tokens) >= request.budget or looped:
            self._finish(request, looped)

    def _finish(self, request: _Request, looped: bool) -> None:
        row = self._rows.index(request)
        last = len(self._rows) - 1
        if row != last:
            moved = self._rows[last]
            self.cache.move(last, row, moved.length + 1)
            for buffer in (self._input_ids, self._lengths, self._deltas, self._seen):
                buffer[row] = buffer[last]
            self._rows[row] = moved
        self._rows.pop()
        self._active[last] = 0
        self._lengths[last] = 0
        request.future.set_result(
            Completion(
                ids=request.tokens,
                prompt_tokens=request.prompt_tokens,
                reused_tokens=request.reused,
                queue_ms=(request.admitted - request.submitted) * 1000,
                first_token_ms=(request.first_token - request.submitted) * 1000,
                looped=looped,
            )
        )

    def _fail_all(self, exc: Exception) -> None:
        """A decode step failed: every running request fails with it, as `VisionUnavailable` (not the step's own
        error: a `ValueError` there would read as each request's input being refused)."""
        failed = VisionUnavailable(f"the glm engine's decode step failed ({type(exc).__name__}: {exc})")
        failed.__cause__ = exc
        for request in self._rows:
            if not request.future.done():
                request.future.set_exception(failed)
        self._rows = []
        self._active.zero_()
        self._lengths.zero_()

    # --- CUDA graphs ----------------------------------------------------------------------------------------------

    def capture(self) -> None:
        """Capture one decode graph per (batch, span) bucket (CUDA devices with `cuda_graphs` only; before any
        request). A capture that fails leaves that bucket eager and says so in the log."""
        import torch

        if self.device.type != "cuda" or not self.settings.cuda_graphs or self._rows:
            return
        batches = sorted({min(size, self.settings.slots) for size in BATCH_BUCKETS})
        spans = sorted({min(size, self.capacity) for size in SPAN_BUCKETS})
        pool = torch.cuda.graph_pool_handle()
        started = time.perf_counter()
        with torch.inference_mode():
            steps: list[tuple[tuple[Any, ...], Callable[[], None]]] = [
                ((bucket, span), functools.partial(self._decode_step, bucket, span))
                for bucket, span in itertools.product(batches, spans)
            ]
            steps += [
                (("extend", count, span), functools.partial(self._extend_step, count, span))
                for count, span in itertools.product(EXTEND_BUCKETS, spans)
                if count < span
            ]
            for key, step in steps:
                try:
                    self._graphs[key] = self._capture_one(step, pool)
                except Exception:
                    log.exception("glm engine: graph %s not captured; it runs eagerly", key)
        self._lengths.zero_()
        self._active.zero_()
        log.info("glm engine: %d decode graphs captured in %.1f s", len(self._graphs), time.perf_counter() - started)

    def _capture_one(self, step: Callable[[], None], pool: Any) -> Any:
        import torch

        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # warm-up, outside the graph
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            step()
        torch.cuda.synchronize()
        return graph


@dataclass(frozen=True)
class _Tensor:
    tensor: Any

    @property
    def nbytes(self) -> int:
        return int(self.tensor.nbytes)


def _take(source: queue.Queue[_Request]) -> _Request | None:
    try:
        return source.get_nowait()
    except queue.Empty:
        return None


def _drain(source: queue.Queue[_Request]) -> list[_Request]:
    drained = []
    while (request := _take(source)) is not None:
        drained.append(request)
    return drained


def stop_ids_of(generation_config: Any) -> tuple[int, ...]:
    """The token ids that end an answer in a checkpoint's generation config (`eos_token_id`: one id or a list)."""
    ids = generation_config.eos_token_id
    if ids is None:
        return ()
    return tuple(int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids]))
