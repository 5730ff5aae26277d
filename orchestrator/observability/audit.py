"""The audit log: one append-only JSON line per request, on disk before the response is complete.

A record holds what a reviewer needs and nothing a leak could hurt: time, request id, key id, client address,
endpoint, status, SHA-256 digests of the inputs (image, question) and of the answer — never the image, the text or a
key — the route, the stages and backends used, the outcome, and the degraded / disclaimer / human-review flags.

`AuditMiddleware` writes the request's record (`orchestrator.observability.record`) when the response's last body
message is about to go out, and holds that message until the record is written, flushed and fsync'd: a client that
received a whole response can count on its record being on disk, even if the process is killed the next instant.

Records are written by one writer task in group commits: every record waiting when the writer wakes goes out in one
`write` and one `fsync`, so durability costs one disk flush per batch, not per request. The file is rotated by size
(`path` → `path.1` → … → `path.{backups}`).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.observability.record import RecordingMiddleware, RequestRecord


@dataclass
class _Pending:
    line: bytes
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class AuditLog:
    """Group-committed JSON lines in `path`, rotated past `max_bytes` keeping `backups` old files."""

    def __init__(self, path: Path, *, max_bytes: int = 100 * 1024 * 1024, backups: int = 5) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.batches = 0
        self._queue: asyncio.Queue[_Pending] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._file: Any = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = await asyncio.to_thread(self._open)
        self._queue = asyncio.Queue()
        self._writer = asyncio.create_task(self._write_batches(), name="audit-writer")

    async def write(self, record: dict[str, object]) -> None:
        """Append `record`; return once it is on disk (flushed and fsync'd)."""
        if self._queue is None or self._writer is None or self._writer.done():
            raise RuntimeError("the audit log is not running")
        pending = _Pending(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
        await self._queue.put(pending)
        await asyncio.shield(pending.done)

    async def aclose(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        if self._file is not None:
            await asyncio.to_thread(self._file.close)
            self._file = None

    async def _write_batches(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await asyncio.to_thread(self._commit, b"".join(p.line for p in batch))
            except Exception as exc:  # a full or failing disk: every waiting request learns of it
                for pending in batch:
                    pending.done.set_exception(exc)
                continue
            self.batches += 1
            for pending in batch:
                pending.done.set_result(None)

    def _open(self) -> Any:
        """The file, opened for appending. A process killed mid-write may have left a torn last line: it is ended,
        so that it stays one unreadable line instead of swallowing the first record written now."""
        file = open(self.path, "ab")  # noqa: SIM115 (kept open across batches; closed by aclose)
        if file.tell() > 0:
            with open(self.path, "rb") as existing:
                existing.seek(-1, os.SEEK_END)
                torn = existing.read(1) != b"\n"
            if torn:
                file.write(b"\n")
                file.flush()
                os.fsync(file.fileno())
        return file

    def _commit(self, data: bytes) -> None:
        """Write, flush and fsync one batch (in a worker thread), rotating first when it would overflow the file."""
        if self._file.tell() > 0 and self._file.tell() + len(data) > self.max_bytes:
            self._rotate()
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    def _rotate(self) -> None:
        self._file.close()
        for index in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{index + 1}"))
        if self.backups > 0:
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()
        self._file = open(self.path, "ab")  # noqa: SIM115 (kept open across batches; closed by aclose)


class AuditMiddleware(RecordingMiddleware):
    """Writes each API request's record (`RequestRecord.line`) before the last body message goes out."""

    def __init__(self, app: ASGIApp, log: AuditLog, paths: tuple[str, ...] = ("/v1/",)) -> None:
        super().__init__(app, paths)
        self.log = log

    async def serve(self, record: RequestRecord, scope: Scope, receive: Receive, send: Send) -> None:
        written = False

        async def write() -> None:
            nonlocal written
            written = True
            record.duration_ms = round((time.time() - record.time) * 1000, 1)
            await self.log.write(record.line())

        async def send_after_audit(message: Message) -> None:
            last = message["type"] == "http.response.body" and not message.get("more_body", False)
            if last and not written:
                await write()
            await send(message)

        try:
            await self.app(scope, receive, send_after_audit)
        except Exception as exc:  # answered (500) by Starlette's last resort, outside this middleware: audited here
            if not written:
                record.status = record.status or 500
                record.error = type(exc).__name__
                await write()
            raise
        else:
            if not written:  # no response went out: its client disconnected first (`orchestrator.api.disconnect`)
                record.status = record.status or 499
                await write()
