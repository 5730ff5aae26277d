"""A fake OpenAI-compatible server that fails on demand, for the resilience tests of the remote stage clients and
the orchestrator: a Starlette app plus the controller that scripts it.

    server = FaultyServer(model="m", faults=Faults(trickle_delay_s=0.1))
    server.script(["status_500", "ok"])           # the next two chat requests; then `server.default`
    with running(server) as live:                 # uvicorn on 127.0.0.1, port 0 (`tests.servers.serving`)
        backend = await RemoteReasoningBackend.load(base_url=live.base_url, model="m", timeout_s=0.5)
    [first, second] = server.chat_requests        # what came in: time, body, mode

Each `POST /v1/chat/completions` takes the next scripted mode, or `default` when the script is empty, and is
recorded in `received` (so is every other request); `reset()` starts afresh, for a server shared by several tests.
A request for another model than `model` draws its mode but gets vLLM's 404. `GET /v1/models` lists `model`;
`GET /health` answers 200; `GET /stats` counts the chat requests by mode served (for a fake in another process).

| mode                 | what the server does                                                                   |
| -------------------- | -------------------------------------------------------------------------------------- |
| `ok`                 | 200 `text/event-stream`: a role chunk, the answer in `pieces` content chunks, a chunk  |
|                      | with `finish_reason` "stop", a usage chunk, `data: [DONE]`                             |
| `status_500`         | 500 with an OpenAI-style JSON error body                                               |
| `status_503`         | 503, the same body, no `Retry-After`                                                   |
| `status_429`         | 429, the same body, `Retry-After: {faults.retry_after}`                                |
| `hang_before_headers`| reads the request and answers nothing until the client leaves, `release()` is called   |
|                      | (`running` calls it on exit) or `hang_limit_s` passes; then a 503                      |
| `hang_after_headers` | sends 200 and event-stream headers, then nothing, until the same; then ends the body   |
| `trickle`            | the `ok` stream, each event `trickle_delay_s` after the previous one                   |
| `malformed_json`     | a role chunk, then a `data:` line that is not JSON, then `[DONE]`                      |
| `wrong_content_type` | 200 `text/html` (a proxy's error page)                                                 |
| `truncated`          | a role chunk and `cut_after` content chunks, then the body ends properly: no           |
|                      | `finish_reason`, no `[DONE]`                                                           |
| `dropped`            | the same chunks, then the connection is closed mid-body (no terminating chunk; uvicorn |
|                      | logs "ASGI callable returned without completing response")                             |
| `huge_body`          | a 200 stream of `huge_bytes` of content in 64 KiB chunks, then a proper end (the fake  |
|                      | does not enforce `max_tokens`)                                                         |
| `flaky`              | `status_500` with probability `flaky_rate` (a `random.Random(seed)`), else `ok`        |
| `alternate`          | `status_500` and `ok` in turn, starting with `status_500`                              |

A refused connection is no mode: `refused_base_url()` is a base URL on which nothing listens.

The answer is `answer`: a string, or a function of the request's JSON body. The default, `stage_answer`, answers as
each stage's server would: a vision request's `describe` prompt gets a JSON description (`describe_answer`), its
`caption` prompt a caption, its questions `VISION_ANSWER`; a request with no image (the reasoning stage's) gets
`REASONING_ANSWER`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Literal, get_args

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tests.servers import RunningServer, serving, unused_port
from vision_stage.prompts import parse_task_prompt

Mode = Literal["ok", "status_500", "status_503", "status_429", "hang_before_headers", "hang_after_headers",
               "trickle", "malformed_json", "wrong_content_type", "truncated", "dropped", "huge_body", "flaky",
               "alternate"]  # fmt: skip
MODES: tuple[Mode, ...] = get_args(Mode)
Answer = str | Callable[[dict[str, Any]], str]

REASONING_ANSWER = "Judging from the description, this is an ordinary purchase and nothing on it looks unusual."
VISION_ANSWER = "The image shows a short printed receipt."
CAPTION = "A small printed receipt with a few lines of text."
DONE = b"data: [DONE]\n\n"
_HUGE_PIECE = 64 * 1024
_EVENT_STREAM = "text/event-stream; charset=utf-8"


@dataclass(frozen=True)
class Faults:
    """How the failure modes behave."""

    pieces: int = 4
    """Content chunks of an answer (`ok`, `trickle`)."""
    retry_after: str = "1"
    """`status_429`'s `Retry-After`: seconds or an HTTP date."""
    trickle_delay_s: float = 0.05
    hang_limit_s: float = 30.0
    """The longest a hang lasts when neither the client nor `release()` ends it."""
    cut_after: int = 2
    """Content chunks sent before `truncated` and `dropped` stop."""
    huge_bytes: int = 32 * 1024 * 1024
    flaky_rate: float = 0.5
    seed: int = 0


@dataclass(frozen=True)
class Received:
    """One request: when (`time.monotonic()`), what, and for a chat request the mode drawn and the mode served
    (`flaky` and `alternate` serve `ok` or `status_500`)."""

    at: float
    method: str
    path: str
    body: dict[str, Any] | None
    mode: Mode | None = None
    served: Mode | None = None


class FaultyServer:
    """The controller: script modes, read what was received; `app` is the server (serve it with `running`)."""

    def __init__(
        self, model: str = "m", answer: Answer | None = None, *, default: Mode = "ok", faults: Faults | None = None
    ) -> None:
        self.model = model
        self.default: Mode = default
        self.faults = faults or Faults()
        self.received: list[Received] = []
        self._answer = answer if answer is not None else stage_answer
        self._script: deque[Mode] = deque()
        self._lock = threading.Lock()
        self._rng = random.Random(self.faults.seed)
        self._alternated = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._released: asyncio.Event | None = None
        self.app = self._build_app()

    def script(self, modes: Iterable[Mode]) -> None:
        """Serve these modes to the next chat requests, in order (after any still scripted)."""
        with self._lock:
            self._script.extend(modes)

    def reset(self, *, default: Mode = "ok", faults: Faults | None = None) -> None:
        """Start afresh, as if just built with these settings (for a server shared by several tests; call it while
        no request is in flight)."""
        with self._lock:
            self.default, self.faults = default, faults or Faults()
            self._script.clear()
            self.received.clear()
            self._rng = random.Random(self.faults.seed)
            self._alternated = 0

    @property
    def chat_requests(self) -> list[Received]:
        return [entry for entry in list(self.received) if entry.mode is not None]

    def served(self) -> Counter[str]:
        """Chat requests by the mode served."""
        return Counter(str(entry.served) for entry in self.chat_requests)

    def release(self) -> None:
        """End every hang now and any later one at once (thread-safe; a no-op when the app is not running)."""
        loop, released = self._loop, self._released
        if loop is not None and released is not None and not loop.is_closed():
            loop.call_soon_threadsafe(released.set)

    def _build_app(self) -> Starlette:
        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            self._loop, self._released = asyncio.get_running_loop(), asyncio.Event()
            try:
                yield
            finally:
                self._released.set()

        routes = [
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/models", self._models),
            Route("/health", self._health),
            Route("/stats", self._stats),
        ]
        return Starlette(routes=routes, lifespan=lifespan)

    async def _chat(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            self._record(request, None)
            return error_response(400, "the body is not JSON")
        scripted = self._next_mode()
        served = self._resolve(scripted)
        self._record(request, body, scripted, served)
        if body.get("model") != self.model:
            return error_response(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        return await self._respond(served, body, request.receive)

    async def _models(self, request: Request) -> Response:
        self._record(request, None)
        entry = {"id": self.model, "object": "model", "created": 0, "owned_by": "faulty-server"}
        return JSONResponse({"object": "list", "data": [entry]})

    async def _health(self, request: Request) -> Response:
        self._record(request, None)
        return JSONResponse({"status": "ok"})

    async def _stats(self, request: Request) -> Response:
        return JSONResponse({"chat_requests": len(self.chat_requests), "served": dict(self.served())})

    def _record(self, request: Request, body: Any, mode: Mode | None = None, served: Mode | None = None) -> None:
        entry = Received(time.monotonic(), request.method, request.url.path, body, mode, served)
        self.received.append(entry)

    def _next_mode(self) -> Mode:
        with self._lock:
            return self._script.popleft() if self._script else self.default

    def _resolve(self, mode: Mode) -> Mode:
        if mode == "flaky":
            return "status_500" if self._rng.random() < self.faults.flaky_rate else "ok"
        if mode == "alternate":
            self._alternated += 1
            return "status_500" if self._alternated % 2 == 1 else "ok"
        return mode

    async def _respond(self, mode: Mode, body: dict[str, Any], receive: Receive) -> Response:
        faults = self.faults
        if mode.startswith("status_"):
            status = int(mode.removeprefix("status_"))
            headers = {"Retry-After": faults.retry_after} if status == 429 else None
            return error_response(status, f"the faulty server answers {status} (mode {mode})", headers=headers)
        if mode == "hang_before_headers":
            await self._hold(receive)
            return error_response(503, "the faulty server was released from a hang")
        if mode == "hang_after_headers":
            return _HeadersThenHold(self._hold)
        if mode == "wrong_content_type":
            return HTMLResponse("<html><body><h1>502 Bad Gateway</h1></body></html>", 200)
        events = self._events(mode, body)
        if mode == "dropped":
            return _Dropped(events)
        delay = faults.trickle_delay_s if mode == "trickle" else 0.0
        return StreamingResponse(_paced(events, delay), 200, media_type=_EVENT_STREAM)

    def _events(self, mode: Mode, body: dict[str, Any]) -> Iterator[bytes]:
        stream = Sse(self.model)
        if mode == "huge_body":
            return stream.huge(self.faults.huge_bytes)
        if mode == "malformed_json":
            return iter([stream.role(), b'data: {"choices": [{"delta": {"content": "unterminated\n\n', DONE])
        pieces = split(self._answer(body) if callable(self._answer) else self._answer, self.faults.pieces)
        if mode in ("truncated", "dropped"):
            return iter([stream.role(), *(stream.content(piece) for piece in pieces[: self.faults.cut_after])])
        return iter(stream.answer(pieces, prompt_tokens=len(json.dumps(body.get("messages"))) // 4))

    async def _hold(self, receive: Receive) -> None:
        """Wait until the client disconnects, `release()` is called, or `hang_limit_s` passes."""
        released = self._released
        assert released is not None, "the app's lifespan did not run"
        waits = [asyncio.ensure_future(_disconnected(receive)), asyncio.ensure_future(released.wait())]
        try:
            await asyncio.wait(waits, timeout=self.faults.hang_limit_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)


@dataclass(frozen=True)
class Sse:
    """Server-sent events of an OpenAI chat completion stream, in vLLM's layout."""

    model: str

    def chunk(self, delta: dict[str, str], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._event({"choices": [choice]})

    def role(self) -> bytes:
        return self.chunk({"role": "assistant", "content": ""})

    def content(self, text: str) -> bytes:
        return self.chunk({"content": text})

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        return self._event({"choices": [], "usage": usage | {"total_tokens": prompt_tokens + completion_tokens}})

    def answer(self, pieces: Sequence[str], *, prompt_tokens: int = 1) -> list[bytes]:
        """A whole proper stream: role, content, finish reason "stop", usage, `[DONE]`."""
        content = [self.content(piece) for piece in pieces]
        end = [self.chunk({"content": ""}, "stop"), self.usage(prompt_tokens, len(pieces)), DONE]
        return [self.role(), *content, *end]

    def huge(self, size: int) -> Iterator[bytes]:
        """A proper stream whose content is `size` bytes (rounded up to 64 KiB), made lazily."""
        piece = self.content("x" * _HUGE_PIECE)
        count = -(-size // _HUGE_PIECE)
        yield self.role()
        for _ in range(count):
            yield piece
        yield from (self.chunk({"content": ""}, "stop"), self.usage(1, count), DONE)

    def _event(self, fields: dict[str, object]) -> bytes:
        head = {"id": "chatcmpl-faulty", "object": "chat.completion.chunk", "created": 1764048000, "model": self.model}
        return b"data: " + json.dumps(head | fields, separators=(",", ":")).encode() + b"\n\n"


def error_response(
    status: int, message: str, kind: str = "server_error", headers: dict[str, str] | None = None
) -> JSONResponse:
    """An OpenAI-style error body (`error.message`, `type`, `param`, `code`)."""
    error = {"message": message, "type": kind, "param": None, "code": status}
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def split(text: str, pieces: int) -> list[str]:
    """`text` in `pieces` consecutive parts (some empty when the text is shorter)."""
    count = max(1, pieces)
    bounds = [round(i * len(text) / count) for i in range(count + 1)]
    return [text[start:end] for start, end in itertools.pairwise(bounds)]


def describe_answer(lines: Sequence[str] = ("CORNER SHOP", "Coffee 3.50", "TOTAL 3.50"), caption: str = CAPTION) -> str:
    """The JSON description `vision_stage.prompts.DESCRIBE_PROMPT` asks for: `lines` as text lines, one under the
    other (boxes on the 0–1000 scale), a `Total` field when a line starts with TOTAL."""
    step = 800 // max(1, len(lines))
    text_lines = [
        {"text": text, "box": [100, 100 + i * step, 900, 100 + (i + 1) * step]} for i, text in enumerate(lines)
    ]
    fields = [{"key": "Total", "value": line.split()[-1]} for line in lines if line.upper().startswith("TOTAL ")]
    data = {
        "caption": caption,
        "text_lines": text_lines,
        "objects": [{"label": "receipt", "box": [50, 50, 950, 950]}],
        "fields": fields,
        "layout": "A single column of text lines.",
    }
    return json.dumps(data)


def stage_answer(body: dict[str, Any]) -> str:
    """The answer a stage server would give: by the vision prompt's task, or `REASONING_ANSWER` without an image."""
    prompt = vision_prompt(body)
    if prompt is None:
        return REASONING_ANSWER
    task, _ = parse_task_prompt(prompt)
    return {"describe": describe_answer(), "caption": CAPTION}.get(task, VISION_ANSWER)


def vision_prompt(body: dict[str, Any]) -> str | None:
    """The text of the last user message that carries an image part; None when no message carries one."""
    for message in reversed(body.get("messages") or []):
        parts = message.get("content") if isinstance(message, dict) else None
        if isinstance(parts, list) and any(part.get("type") == "image_url" for part in parts):
            return " ".join(str(part.get("text", "")) for part in parts if part.get("type") == "text")
    return None


@contextmanager
def running(server: FaultyServer) -> Iterator[RunningServer]:
    """Serve `server.app` on 127.0.0.1 until the block ends; hangs still open are released first."""
    with serving(server.app) as live:
        try:
            yield live
        finally:
            server.release()


def refused_base_url() -> str:
    """A `/v1` base URL on 127.0.0.1 where connections are refused."""
    return f"http://127.0.0.1:{unused_port()}/v1"


async def _paced(events: Iterator[bytes], delay_s: float) -> AsyncIterator[bytes]:
    for event in events:
        await asyncio.sleep(delay_s)  # also lets a disconnect be noticed between the writes of a huge body
        yield event


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _HeadersThenHold(StreamingResponse):
    """200 with event-stream headers, then nothing until `hold` returns; then the body ends, empty."""

    def __init__(self, hold: Callable[[Receive], Awaitable[None]]) -> None:
        super().__init__(iter(()), media_type=_EVENT_STREAM)
        self._hold = hold

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": b"", "more_body": True})
        await self._hold(receive)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class _Dropped(StreamingResponse):
    """200 event-stream, `events`, then return without finishing the body: uvicorn closes the connection."""

    def __init__(self, events: Iterator[bytes]) -> None:
        self._events = list(events)
        super().__init__(iter(self._events), media_type=_EVENT_STREAM)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        for event in self._events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
