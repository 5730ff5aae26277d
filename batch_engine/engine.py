"""The batching engine: greedy generation for many requests at once on one device, over the
transformers model (GLM-4.6V-Flash with its images, or a causal text LM such as GLM-4), whose code runs unchanged
(its q/k/v projections fused into one product: `batch_engine.projections`).

One thread owns the model. Requests come through a bounded queue (`submit`; a full queue is the caller's
`unavailable` error with a retry hint) as the processor's or tokenizer's output, prepared off that thread, with
their positions already computed: for M-RoPE by the model's own `get_rope_index` (once per request; decode
positions are then length + delta, passed explicitly: the model's shared `rope_deltas` is never used). Each `step`
of the thread:

1. admits waiting requests into free slots, under a prefill token budget and at most one image prefill per step
   (an image's prompt is never split): each admitted request is prefilled and yields its first token, and the
   first prefill from position 0 may take the requests already in slots along (`EngineSettings.ride_along`, off by
   default): each decodes one token in that forward, as in a decode step, which the step then does not launch;
2. else launches one decode step for every request in a slot, the new ones included: greedy, one token each, on the
   device, as one CUDA graph per (batch, span) bucket when the device is a GPU;
3. reads the tokens of the step launched before (`EngineSettings.overlap`; else of this one): the device runs one
   step while the thread handles the last one's tokens, so it does not wait for the host between steps. It hands
   each request its new token (`on_token`, when it streams) and finished requests all their tokens (after a
   stop token, the token budget, or a loop: `stage_protocol.loops`), and moves the last slot into each freed one,
   so the slots in use stay first.

Reuse: the vision encoder's output is kept per image, and so is the KV of the prompt up to the image's end token,
both keyed by the decoded image's content hash with the prefix's token ids: a follow-up question on the same image (a
session, a probe, a re-ask, another task with the same prefix) prefills only its own text. A prompt without an image
keeps its KV in blocks of `TEXT_BLOCK` tokens, keyed by the hash of every token up to each block's end: a follow-up
on the same description prefills only what follows the longest block it shares with an earlier prompt. The steps on
the device are `batch_engine.steps`; storage and attention, `batch_engine.slots`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, InvalidStateError
from dataclasses import replace
from typing import Any

from batch_engine.attention_plans import IDLE_S, RecurringCalls, build_plans, serve
from batch_engine.compiling import recompile_limit_hits, use_dynamo_settings, warm_prefills
from batch_engine.greedy import stop_ids_of
from batch_engine.host import prefill_graphs
from batch_engine.prompts import Prompt, prompt_of
from batch_engine.queued import Launched, Request, drain, take
from batch_engine.settings import EngineSettings
from batch_engine.steps import DeviceSteps
from batch_engine.stores import StoredKV
from batch_engine.types import PLAIN_REFUSALS, Completion, EngineStats, Refusals
from stage_protocol.loops import WINDOW, repeats_at_end

log = logging.getLogger("batch_engine")


class BatchEngine:
    """Continuous batching over a transformers model (module docstring). `start` runs `step` on its own thread;
    tests and benchmarks may instead call `step` themselves, from one thread."""

    def __init__(self, model: Any, settings: EngineSettings, refusals: Refusals = PLAIN_REFUSALS) -> None:
        graphs = prefill_graphs(
            settings.prefill_graphs, model.device, cuda_graphs=settings.cuda_graphs,
            named=refusals.setting("_PREFILL_GRAPHS"),
        )  # fmt: skip
        self.model = model
        self.settings = settings = replace(settings, prefill_graphs=graphs)
        """The settings as given, `prefill_graphs` decided (`batch_engine.host.prefill_graphs`)."""
        self.refusals = refusals
        self.device = DeviceSteps(model, settings)
        self.recurring = RecurringCalls() if self.device.plans_by_power_of_two else None
        """The attention calls that recur on the engine's thread, each given a plan of its own while the thread idles
        (`EngineSettings.recurring_plans`), where cuDNN plans per power of two."""
        self.stop_ids = frozenset(stop_ids_of(model.generation_config))
        self._queue: queue.Queue[Request] = queue.Queue(maxsize=settings.queue_size)
        self._held: Request | None = None
        self._rows: list[Request] = []
        self._unread: Launched | None = None
        """The decode step launched last, its tokens not yet read (`settings.overlap`)."""
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._planned = threading.Event()
        self.steps = 0
        self.batch_sizes: deque[int] = deque(maxlen=4096)
        """The decode batch size of the latest steps."""
        self._abandoned: set[Future[Completion]] = set()
        self._decoded = 0
        self._ridden = 0
        """Decode steps taken inside a prefill's forward."""
        self._admitted = 0
        self._queue_ms = 0.0

    # --- the caller's side ----------------------------------------------------------------------------------------

    def submit(
        self,
        inputs: Mapping[str, Any],
        *,
        image_key: str | None,
        max_new_tokens: int,
        on_token: Callable[[int], None] | None = None,
        future: Future[Completion] | None = None,
    ) -> Future[Completion]:
        """Queue one prompt (the processor's output for one image, or the tokenizer's for a text); its positions are
        computed here, on the caller's thread. `on_token` is called with each new token on the engine's thread, as
        it is chosen (it must not block). The refusals' `rejected` when the prompt leaves no room in a slot,
        `unavailable` when the queue is full or the engine is closed; an engine that closes while this call runs
        fails the returned future with `unavailable` instead.

        `future` is the one to complete (a new one when None): a caller that may give the request up while this
        call still runs makes a new `Future` first and `abandon`s it whenever it likes. One abandoned before this
        call is returned as it is, cancelled, and nothing is queued; one abandoned while this call runs is queued
        and dropped when the engine reaches it. A `future` already running or finished is a `ValueError`."""
        if future is None:
            future = Future()
        elif future.running() or (future.done() and not future.cancelled()):
            raise ValueError("`future` must be a new Future: this one is already running or finished")
        elif future.cancelled():
            return future
        if self._closed.is_set():
            raise self.refusals.unavailable("the batching engine is closed")
        ids = inputs["input_ids"][0]
        room = self.settings.max_tokens - int(ids.shape[0])
        if room < 1:
            raise self.refusals.rejected(
                f"the prompt is {int(ids.shape[0])} tokens but a slot of the batching engine holds at most "
                f"{self.settings.max_tokens} ({self.refusals.setting('_MAX_TOKENS')})"
            )
        prompt = self.prepare(inputs, image_key)
        request = Request(prompt, budget=min(max_new_tokens, room), future=future, on_token=on_token)
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise self.refusals.unavailable(
                f"the batching engine has {self.settings.queue_size} requests waiting already", retry_after_s=1.0
            ) from None
        self._wake.set()
        if self._closed.is_set():  # closed meanwhile: `close` may have emptied the queue before this request came
            self._fail_closed(drain(self._queue))
        return future

    def prepare(self, inputs: Mapping[str, Any], image_key: str | None) -> Prompt:
        """One prompt's model inputs as the engine runs them (`batch_engine.prompts.prompt_of`)."""
        rope_index = self.model.model.get_rope_index if self.device.axes == 3 else None
        return prompt_of(inputs, image_key, rope_index=rope_index, image_end_id=self.device.image_end_id)

    async def wait(self, future: Future[Completion]) -> Completion:
        """`future`'s completion, awaited without holding anything; cancelling the awaiting task abandons it
        (`abandon`): a request still queued never runs, one running leaves its slot after the next step."""
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self.abandon(future)
            raise

    def abandon(self, future: Future[Completion]) -> None:
        """The caller no longer wants `future`'s answer (it was cancelled, or its client left): a request still
        waiting never runs; one running leaves its slot after the engine's next step."""
        if future.done() or future.cancel():
            return
        self._abandoned.add(future)
        self._wake.set()

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
            prefix_hits=self.device.prefixes.hits,
            prefix_misses=self.device.prefixes.misses,
            encoder_hits=self.device.encoder.hits,
            recompile_limit_hits=recompile_limit_hits() if self.device.compiled else 0,
            ridden=self._ridden,
            encoder_replays=graphs.replays if (graphs := self.device.encoder_graphs) is not None else 0,
        )

    def start(self) -> None:
        """Capture the decode and extend steps' graphs, and the padded prefills' (`prefill_graphs`), on a GPU; compile
        the prefills (`warm_prefills`, when the layers are compiled); and run `step` on the engine's own thread until
        `close`, once that thread has built its attention plans."""
        self.device.capture()
        if self.device.compiled:
            warm_prefills(self.prepare, self.device)
        self._thread = threading.Thread(target=self._run, name="batch-engine", daemon=True)
        self._thread.start()
        self._planned.wait()

    def close(self) -> None:
        """Stop the thread after its current step; requests still waiting or running fail with the refusals'
        `unavailable`."""
        self._closed.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self._fail_closed([*self._rows, *([self._held] if self._held else []), *drain(self._queue)])
        self._rows, self._held, self._unread = [], None, None

    def _fail_closed(self, requests: list[Request]) -> None:
        """Fail `requests` with the refusals' `unavailable`: the engine is closed."""
        closed = self.refusals.unavailable("the batching engine was closed")
        for request in requests:
            with contextlib.suppress(InvalidStateError):  # its caller may abandon it meanwhile, from another thread
                if not request.future.done():
                    request.future.set_exception(closed)

    def _run(self) -> None:
        import torch

        try:  # `start` waits for this, however it ends
            if self.device.compiled:
                use_dynamo_settings()  # this thread's own (`batch_engine.compiling.use_dynamo_settings`)
            serve(self.recurring)
            build_plans(self.model, self.settings.max_tokens, vision=self.device.packed_vision)
        finally:
            self._planned.set()
        idle_since = time.monotonic()
        with torch.inference_mode():
            while not self._closed.is_set():
                try:
                    worked = self.step()
                except Exception as exc:  # the model failed: fail what it was doing, keep serving
                    log.exception("batching engine: a step failed")
                    self._fail_all(exc)
                    worked = True
                if worked:
                    idle_since = time.monotonic()
                elif not (time.monotonic() - idle_since >= IDLE_S and self.recurring and self.recurring.build_one()):
                    self._wake.wait(0.05)  # else one recurring attention call was planned; more may wait
                    self._wake.clear()

    # --- the engine's thread --------------------------------------------------------------------------------------

    def step(self) -> bool:
        """Admit, prefill, decode once, finish (module docstring); whether there was anything to do."""
        import torch

        with torch.inference_mode():
            admitted, rode = self._admit()
            if not self._rows and self._unread is None:
                return admitted
            launched = rode if rode is not None else self._launch() if self._rows else None
            previous, self._unread = self._unread, launched
            if previous is not None:
                self._deliver(previous)
            if not self.settings.overlap and self._unread is not None:
                self._deliver(self._unread)
                self._unread = None
            self._leave_abandoned()
            return True

    def run_until_idle(self) -> None:
        """Step until nothing waits or runs (tests and benchmarks, on their own thread)."""
        while self.step():
            pass

    def _admit(self) -> tuple[bool, Launched | None]:
        """Admit and prefill what the step's budget allows: whether any was admitted, and the decode step the rows
        in use rode along in (the first prefill's, when it `rides`), in place of a launched one."""
        spent, image_prefilled, admitted = 0, False, False
        rode: Launched | None = None
        while len(self._rows) < self.settings.slots:
            request, self._held = self._held, None
            if request is None:
                request = take(self._queue)
                if request is None:
                    break
                if not request.future.set_running_or_notify_cancel():
                    continue
            if not request.looked_up:  # once: a request held back to the next step keeps what it found
                try:
                    request.stored, request.looked_up = self.device.prefixes.find(request.prompt), True
                except Exception as exc:  # its inputs are not what a prompt holds: fail it alone
                    request.future.set_exception(exc)
                    continue
            stored = request.stored
            cost = request.prompt.tokens - (stored.tokens if stored else 0)
            needs_image = stored is None and request.prompt.pixel_values is not None
            if admitted and ((needs_image and image_prefilled) or spent + cost > self.settings.prefill_tokens):
                self._held = request
                break
            request.stored = None
            rides = rode is None and self.settings.ride_along and self.device.rides(stored)
            riders = list(self._rows) if rides else []
            try:
                self._prefill(request, stored, riders)
            except Exception as exc:  # this request's inputs failed the model: fail it alone
                request.future.set_exception(exc)
                continue
            if riders:
                rode = self._decoded_by(riders, self.device.tokens(len(riders)))
                self._ridden += 1
            spent, image_prefilled, admitted = spent + cost, image_prefilled or needs_image, True
        return admitted, rode

    def _prefill(self, request: Request, stored: StoredKV | None, riders: list[Request]) -> None:
        request.admitted = time.perf_counter()
        self._admitted += 1
        self._queue_ms += (request.admitted - request.submitted) * 1000
        longest = max((rider.length for rider in riders), default=0)
        if self.recurring is not None:
            self.recurring.turn(enabled=self.settings.recurring_plans)
        token = self.device.prefill(request.prompt, len(self._rows), stored, longest)
        request.reused = stored.tokens if stored else 0
        request.length = request.prompt.tokens
        self._rows.append(request)
        request.first_token = time.perf_counter()
        self._accept(request, token)

    def _launch(self) -> Launched:
        """One decode step for every row, launched; its tokens are read by `_deliver`."""
        rows = list(self._rows)
        return self._decoded_by(rows, self.device.launch(len(rows), max(request.length for request in rows)))

    def _decoded_by(self, rows: list[Request], read: Callable[[], list[int]]) -> Launched:
        """`rows` decoded one token each, in a launched step or a prefill's forward; `read` gives their tokens."""
        for request in rows:
            request.length += 1  # what its slot holds once the step has run
        self.steps += 1
        self.batch_sizes.append(len(rows))
        self._decoded += len(rows)
        return rows, read

    def _deliver(self, launched: Launched) -> None:
        """A launched step's tokens to its rows' requests; one that finished after the step was launched (at the
        step before) takes nothing, its extra token computed and dropped."""
        rows, read = launched
        for request, token in zip(rows, read(), strict=True):
            if not request.future.done():
                self._accept(request, token)

    def _leave_abandoned(self) -> None:
        for request in [request for request in self._rows if request.future in self._abandoned]:
            self._abandoned.discard(request.future)
            self._finish(request, looped=False)  # nobody reads it: the slot is what matters
        for future in [future for future in list(self._abandoned) if future.done()]:
            self._abandoned.discard(future)  # it finished while its caller was leaving

    def _accept(self, request: Request, token: int) -> None:
        request.tokens.append(token)
        if request.on_token is not None:
            try:
                request.on_token(token)
            except Exception:  # a listener that has gone (its event loop closed) stops nothing here
                log.debug("batching engine: a token listener failed", exc_info=True)
        looped = self.settings.stop_loops and repeats_at_end(request.tokens[-WINDOW:])
        if token in self.stop_ids or len(request.tokens) >= request.budget or looped:
            self._finish(request, looped)

    def _finish(self, request: Request, looped: bool) -> None:
        row = self._rows.index(request)
        last = len(self._rows) - 1
        if row != last:
            moved = self._rows[last]
            self.device.move(last, row, moved.length + 1)
            self._rows[row] = moved
        else:
            self.device.release(last)
        self._rows.pop()
        request.future.set_result(
            Completion(
                ids=request.tokens,
                prompt_tokens=request.prompt.tokens,
                reused_tokens=request.reused,
                queue_ms=(request.admitted - request.submitted) * 1000,
                first_token_ms=(request.first_token - request.submitted) * 1000,
                looped=looped,
            )
        )

    def _fail_all(self, exc: Exception) -> None:
        """A decode step failed: every running request fails with it, as the refusals' `unavailable` (not the step's
        own error: a `ValueError` there would read as each request's input being refused)."""
        failed = self.refusals.unavailable(f"the batching engine's decode step failed ({type(exc).__name__}: {exc})")
        failed.__cause__ = exc
        for request in self._rows:
            if not request.future.done():
                request.future.set_exception(failed)
        self._rows, self._unread = [], None
        self.device.reset()
