"""Running batches: this process's workers take batches from an in-process queue, check their input file, and send
each request through the app itself, as its owner, collecting the answers into the output and error files.

A request of a batch goes through the same middleware and handlers as one from a client (the same validation,
pipeline, output filter, audit record and metrics), marked in its ASGI scope with `BATCH_OWNER`, which no HTTP
client can set: `SecurityMiddleware` then takes the owner from it instead of an API key and counts it against no
rate limit (the runner paces bulk work itself: `workers` batches at once, `concurrency` requests of each). Interactive
requests keep their limits and are served first by nothing more than that bound.

The input is checked whole before anything runs, as OpenAI does: every line a JSON object with a `custom_id` unique in
the file, `method` `POST`, `url` the batch's endpoint and a `body` object. A file that fails is a `failed` batch with
one error per bad line. A 2xx answer goes to the output file, anything else to the error file, each line
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`. A cancelled batch stops taking new
requests, lets those under way finish, and keeps what it has.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from dataclasses import replace
from typing import Any, Protocol

from starlette.types import ASGIApp, Message

from orchestrator.bulk.files import BatchRecord, BatchStatus, BulkStore, Counts, FileRecord

log = logging.getLogger(__name__)

BATCH_OWNER = "orchestrator.batch_owner"
"""The ASGI scope key that marks a request a batch sends for its owner."""


class Batches(Protocol):
    """What the Batch API's endpoints ask of bulk work: `BatchRunner` in this process, or
    `orchestrator.bulk.shared.SharedBatches` across the replicas (`ORCH_STATE__URL`)."""

    async def add_file(self, owner: str, filename: str, purpose: str, data: bytes) -> FileRecord: ...

    async def file(self, file_id: str, owner: str) -> FileRecord: ...

    async def content(self, record: FileRecord) -> bytes: ...

    async def submit(self, record: BatchRecord) -> BatchRecord: ...

    async def batch(self, batch_id: str, owner: str) -> BatchRecord: ...

    async def batches(self, owner: str) -> list[BatchRecord]: ...

    async def cancel(self, record: BatchRecord) -> BatchRecord: ...

    async def aclose(self) -> None: ...


class Observer:
    """What `/metrics` counts of bulk work: each request run (answered or not) and each batch ended (by its final
    status). The app replaces these no-ops with its counters."""

    def request(self, answered: bool) -> None:
        pass

    def batch(self, status: str) -> None:
        pass


class BatchRunner:
    """The queue and the workers (module docstring)."""

    def __init__(self, app: ASGIApp, store: BulkStore, *, workers: int = 2, concurrency: int = 4) -> None:
        self.app = app
        self.store = store
        self._workers = workers
        self._concurrency = concurrency
        self._queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._cancelled: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self.observe = Observer()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(), name=f"batch-worker-{n}") for n in range(self._workers)]

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def add_file(self, owner: str, filename: str, purpose: str, data: bytes) -> FileRecord:
        return self.store.add_file(owner, filename, purpose, data)

    async def file(self, file_id: str, owner: str) -> FileRecord:
        return self.store.file(file_id, owner)

    async def content(self, record: FileRecord) -> bytes:
        return self.store.content(record)

    async def batch(self, batch_id: str, owner: str) -> BatchRecord:
        return self.store.batch(batch_id, owner)

    async def batches(self, owner: str) -> list[BatchRecord]:
        return self.store.batches(owner)

    async def submit(self, record: BatchRecord) -> BatchRecord:
        self.store.put_batch(record)
        self._queue.put_nowait((record.id, record.owner))
        return record

    async def cancel(self, record: BatchRecord) -> BatchRecord:
        """`cancelling` until the worker stops it (at once when it has not started)."""
        if record.status not in ("validating", "in_progress"):
            return record
        self._cancelled.add(record.id)
        return self.store.put_batch(record.entering("cancelling"))

    async def _work(self) -> None:
        while True:
            batch_id, owner = await self._queue.get()
            try:
                await self._run(self.store.batch(batch_id, owner))
            except Exception:  # a worker never dies of one batch
                log.exception("batch %s failed to run", batch_id)

    async def _run(self, record: BatchRecord) -> None:
        if record.id in self._cancelled:
            self.store.put_batch(record.entering("cancelled"))
            return
        data = self.store.content(self.store.file(record.input_file_id, record.owner))
        lines, errors = await asyncio.to_thread(read_input, data, record)  # a large file: off the event loop
        if errors:
            self.store.put_batch(record.entering("failed", errors=tuple(errors)))
            self.observe.batch("failed")
            return
        record = self.store.put_batch(record.entering("in_progress", counts=Counts(total=len(lines))))
        results: list[dict[str, Any] | None] = [None] * len(lines)
        gate = asyncio.Semaphore(self._concurrency)

        async def one(index: int, line: dict[str, Any]) -> None:
            nonlocal record
            async with gate:
                if record.id in self._cancelled:
                    return
                results[index] = await run_line(self.app, record, line)
            ok = answered(results[index])  # type: ignore[arg-type]
            counts = record.counts
            tally = Counts(counts.total, counts.completed + ok, counts.failed + (not ok))
            current = self.store.batch(record.id, record.owner)  # its status may have changed (a cancel)
            record = self.store.put_batch(replace(current, counts=tally))
            self.observe.request(ok)

        await asyncio.gather(*(one(index, line) for index, line in enumerate(lines)))
        self._finish(record, [result for result in results if result is not None])

    def _finish(self, record: BatchRecord, results: list[dict[str, Any]]) -> None:
        record = self.store.put_batch(record.entering("finalizing"))
        files = {
            kind: self.store.add_file(record.owner, name, "batch_output", data).id
            for kind, (name, data) in result_files(record, results).items()
        }
        final: BatchStatus = "cancelled" if record.id in self._cancelled else "completed"
        self._cancelled.discard(record.id)
        self.store.put_batch(
            record.entering(final, output_file_id=files.get("output"), error_file_id=files.get("error"))
        )
        self.observe.batch(final)


RETRIES = 3
"""How often a batch request refused for load (429, 503 with `Retry-After`) is sent again before it counts as
failed: bulk work waits for room rather than failing when interactive work fills the stages."""


async def run_line(app: ASGIApp, record: BatchRecord, line: dict[str, Any]) -> dict[str, Any]:
    """One request of `record`'s input through `app`, as the output or error file's line."""
    for attempt in range(RETRIES + 1):
        status, headers, body = await call_app(app, record.owner, record.endpoint, line["body"])
        wait_s = headers.get("retry-after")
        if status not in (429, 503) or wait_s is None or not wait_s.isdigit() or attempt == RETRIES:
            break
        await asyncio.sleep(min(float(wait_s), 30.0))
    response = {"status_code": status, "request_id": headers.get("x-request-id"), "body": body}
    return {"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": line["custom_id"], "response": response,
            "error": None}  # fmt: skip


def answered(entry: dict[str, Any]) -> bool:
    """Whether a result line goes to the output file (a 2xx answer) rather than the error file."""
    return 200 <= int(entry["response"]["status_code"]) < 300


def result_files(record: BatchRecord, results: list[dict[str, Any]]) -> dict[str, tuple[str, bytes]]:
    """A batch's `output` (2xx answers) and `error` files, as a file name and JSONL bytes each; a kind with no line
    has no file."""
    files = {}
    for kind, keep in (("output", True), ("error", False)):
        lines = [json.dumps(entry, ensure_ascii=False) + "\n" for entry in results if answered(entry) == keep]
        if lines:
            files[kind] = (f"{record.id}_{kind}.jsonl", "".join(lines).encode())
    return files


def read_input(data: bytes, record: BatchRecord) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The requests of a batch's input file, or the errors of its bad lines (module docstring)."""
    lines: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return [], [_error(None, "the input file is not UTF-8 text")]
    for number, raw in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 is valid inside a JSON string
        if not raw.strip():
            continue
        problem = _problem(raw, record.endpoint, seen)
        if isinstance(problem, str):
            errors.append(_error(number, problem))
        else:
            lines.append(problem)
    if not lines and not errors:
        errors.append(_error(None, "the input file holds no requests"))
    return lines, errors


def _problem(raw: str, endpoint: str, seen: set[str]) -> dict[str, Any] | str:
    try:
        line = json.loads(raw)
    except ValueError:
        return "not a JSON object"
    if not isinstance(line, dict):
        return "not a JSON object"
    custom_id, body = line.get("custom_id"), line.get("body")
    if not isinstance(custom_id, str) or not custom_id:
        return "`custom_id` must be a non-empty string"
    if custom_id in seen:
        return f"`custom_id` {custom_id!r} is used twice"
    if line.get("method") != "POST":
        return "`method` must be POST"
    if line.get("url") != endpoint:
        return f"`url` must be the batch's endpoint, {endpoint}"
    if not isinstance(body, dict):
        return "`body` must be a JSON object"
    seen.add(custom_id)
    return line


def _error(line: int | None, message: str) -> dict[str, Any]:
    return {"code": "invalid_request", "message": message, "param": None, "line": line}


async def call_app(app: ASGIApp, owner: str, path: str, body: Any) -> tuple[int, dict[str, str], Any]:
    """POST `body` as JSON to `path` of `app`, in-process, as a request of `owner`'s batch: status, headers, and the
    JSON answer (the text, when it is not JSON)."""
    payload = json.dumps(body).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), BATCH_OWNER: owner,
    }  # fmt: skip
    finished = asyncio.Event()
    pending: list[Message] = [{"type": "http.request", "body": payload, "more_body": False}]
    status, headers, chunks = 500, dict[str, str](), list[bytes]()

    async def receive() -> Message:
        if pending:
            return pending.pop()
        await finished.wait()  # no disconnect before the answer is whole: the batch is waiting for it
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            headers.update((name.decode().lower(), value.decode()) for name, value in message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                finished.set()

    try:
        await app(scope, receive, send)
    except Exception as exc:  # the app answered 500 (or nothing) and raised: the line fails, the batch goes on
        log.exception("batch request to %s failed", path)
        if not chunks:
            status, chunks = 500, [json.dumps({"error": {"type": "internal_error", "message": str(exc)}}).encode()]
    finally:
        finished.set()
    text = b"".join(chunks).decode(errors="replace")
    try:
        return status, headers, json.loads(text)
    except ValueError:
        return status, headers, text
