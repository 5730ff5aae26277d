"""Batches shared by the replicas through Redis (`ORCH_STATE__URL`): a batch created on one replica is run by the
workers of all of them and read back on any, and a replica that dies mid-item loses nothing.

Files are Redis hashes (`bulk:file:<id>`: the record and the bytes), batches are records (`bulk:batch:<id>`) with
their counts beside them (`bulk:counts:<id>`), and each owner's batches an index by creation time. Once a batch's
input checks out, each of its requests becomes one entry of a Redis Stream (`bulk:items`) read through one consumer
group by every replica's workers. A worker acknowledges an entry only after its result is stored
(`bulk:results:<batch>`, one field per line, written only if absent, so that an entry run twice counts once); an
entry a dead replica took and never acknowledged is claimed by another worker once it has waited `visibility_s`
(`XAUTOCLAIM`), and run again. The worker that stores a batch's last result writes its output and error files and
completes it; a batch being cancelled skips its remaining entries and ends `cancelled` with what it has.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, replace
from typing import Any, ParamSpec, TypeVar

from redis.exceptions import RedisError, ResponseError
from starlette.types import ASGIApp

from orchestrator.bulk.files import BatchRecord, Counts, FileRecord, new_id
from orchestrator.bulk.runner import Observer, answered, read_input, result_files, run_line
from orchestrator.errors import BatchesUnavailable, BatchNotFound, FileNotFound

log = logging.getLogger(__name__)

TIMEOUT_S = 1.0
STREAM = "bulk:items"
GROUP = "workers"
RETENTION_S = 7 * 24 * 3600
"""How long files, batches and results are kept."""


_MOVE = """
local stored = redis.call('GET', KEYS[1])
if not stored then return 0 end
local status = cjson.decode(stored)['status']
for i = 3, #ARGV do
  if ARGV[i] == status then
    redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
    return 1
  end
end
return 0
"""
"""Replace a batch's record (ARGV[1], kept ARGV[2] seconds) if its stored status is one of ARGV[3…]."""

P = ParamSpec("P")
R = TypeVar("R")


def _shared(method: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """An API method whose Redis failing is `BatchesUnavailable` (503, retry after a second), never a 500."""

    @functools.wraps(method)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except (RedisError, OSError, TimeoutError) as exc:
            raise BatchesUnavailable(
                f"the shared batch store does not answer ({type(exc).__name__}); retry shortly", retry_after_s=1.0
            ) from exc

    return guarded


class SharedBatches:
    """The Batch API's files and batches in Redis at `url`, run by `workers` tasks of this replica (module
    docstring)."""

    def __init__(self, app: ASGIApp, url: str, *, workers: int, visibility_s: float) -> None:
        import redis.asyncio as redis

        self.app = app
        self._client = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=TIMEOUT_S)
        self._workers = workers
        self._visibility_ms = int(visibility_s * 1000)
        self._consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._tasks: list[asyncio.Task[None]] = []
        self.observe = Observer()
        self._grouped = False
        self._move_script = self._client.register_script(_MOVE)

    async def start(self) -> None:
        """Start the workers; they wait for Redis when it is not there yet (a replica starts without it)."""
        self._tasks = [asyncio.create_task(self._work(), name=f"batch-worker-{n}") for n in range(self._workers)]

    async def _ensure_group(self) -> None:
        if self._grouped:
            return
        try:
            await self._client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except ResponseError as exc:  # BUSYGROUP: another replica (or worker) made it
            if "BUSYGROUP" not in str(exc):
                raise
        self._grouped = True

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()

    # --- files and batches --------------------------------------------------------------------------------------

    @_shared
    async def add_file(self, owner: str, filename: str, purpose: str, data: bytes) -> FileRecord:
        record = FileRecord(new_id("file"), owner, len(data), int(time.time()), filename, purpose)
        key = f"bulk:file:{record.id}"
        await self._client.hset(key, mapping={"record": json.dumps(asdict(record)), "data": data})
        await self._client.expire(key, RETENTION_S)
        return record

    @_shared
    async def file(self, file_id: str, owner: str) -> FileRecord:
        found = await self._client.hget(f"bulk:file:{file_id}", "record")
        record = FileRecord(**json.loads(found)) if found else None
        if record is None or record.owner != owner:
            raise FileNotFound(f"no file {file_id!r} of this caller")
        return record

    @_shared
    async def content(self, record: FileRecord) -> bytes:
        data: Any = await self._client.hget(f"bulk:file:{record.id}", "data")
        return bytes(data or b"")

    @_shared
    async def batch(self, batch_id: str, owner: str) -> BatchRecord:
        record = await self._read(batch_id)
        if record is None or record.owner != owner:
            raise BatchNotFound(f"no batch {batch_id!r} of this caller")
        return record

    @_shared
    async def batches(self, owner: str) -> list[BatchRecord]:
        ids: Any = await self._client.zrevrange(f"bulk:owner:{owner}", 0, -1)
        records = [await self._read(batch_id.decode()) for batch_id in ids]
        return [record for record in records if record is not None]

    @_shared
    async def submit(self, record: BatchRecord) -> BatchRecord:
        await self._client.zadd(f"bulk:owner:{record.owner}", {record.id: record.created_at})
        data = await self.content(await self.file(record.input_file_id, record.owner))
        lines, errors = await asyncio.to_thread(read_input, data, record)  # a large file: off the event loop
        if errors:
            self.observe.batch("failed")
            return await self._write(record.entering("failed", errors=tuple(errors)))
        record = await self._write(record.entering("in_progress", counts=Counts(total=len(lines))))
        async with self._client.pipeline(transaction=False) as pipe:
            for index, line in enumerate(lines):
                pipe.xadd(STREAM, {"batch": record.id, "index": index, "line": json.dumps(line)})
            await pipe.execute()
        return record

    @_shared
    async def cancel(self, record: BatchRecord) -> BatchRecord:
        if record.status not in ("validating", "in_progress"):
            return record
        if not await self._move(record.entering("cancelling"), ("validating", "in_progress")):
            return await self._read(record.id) or record  # it ended meanwhile: as it ended
        await self._maybe_finish(record.id)
        return await self._read(record.id) or record

    async def _read(self, batch_id: str) -> BatchRecord | None:
        found = await self._client.get(f"bulk:batch:{batch_id}")
        if not found:
            return None
        data = json.loads(found)
        counts = await self._client.hgetall(f"bulk:counts:{batch_id}")
        data["counts"] = Counts(
            total=data["counts"]["total"],
            completed=int(counts.get(b"completed", 0)),
            failed=int(counts.get(b"failed", 0)),
        )
        data["errors"] = tuple(data["errors"])
        return BatchRecord(**data)

    async def _move(self, record: BatchRecord, allowed: tuple[str, ...]) -> bool:
        """Write `record` only if the stored one's status is one of `allowed` (atomically: a cancel and the last
        result, on two replicas, cannot overwrite each other)."""
        moved = await self._move_script(
            keys=[f"bulk:batch:{record.id}"], args=[json.dumps(asdict(record)), RETENTION_S, *allowed]
        )
        return bool(moved)

    async def _write(self, record: BatchRecord) -> BatchRecord:
        await self._client.set(f"bulk:batch:{record.id}", json.dumps(asdict(record)), ex=RETENTION_S)
        return record

    # --- the workers ----------------------------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            try:
                await self._ensure_group()
                entry = await self._next()
                if entry is not None:
                    await self._run(*entry)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away, or one entry that failed: keep serving
                task = asyncio.current_task()
                if task is not None and task.cancelling():  # stopped (`aclose`), though the client said otherwise
                    raise asyncio.CancelledError from exc
                if "NOGROUP" in str(exc):  # the stream went with a restarted Redis: make it again
                    self._grouped = False
                log.exception("batch worker: an entry failed")
                await asyncio.sleep(1.0)

    async def _next(self) -> tuple[bytes, dict[bytes, bytes]] | None:
        """An entry another worker left unacknowledged for `visibility_s`, else a new one (waiting up to a second)."""
        claimed: Any = await self._client.xautoclaim(STREAM, GROUP, self._consumer, self._visibility_ms, "0-0", count=1)
        if claimed and claimed[1]:
            entry_id, fields = claimed[1][0]
            if fields:
                return entry_id, fields
        fresh: Any = await self._client.xreadgroup(GROUP, self._consumer, {STREAM: ">"}, count=1, block=1000)
        if fresh and fresh[0][1]:
            entry_id, fields = fresh[0][1][0]
            return entry_id, fields
        return None

    async def _run(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        batch_id, index = fields[b"batch"].decode(), fields[b"index"].decode()
        record = await self._read(batch_id)
        results = f"bulk:results:{batch_id}"
        if record is not None and record.status == "in_progress" and not await self._client.hexists(results, index):
            result = await run_line(self.app, record, json.loads(fields[b"line"]))
            if await self._client.hsetnx(results, index, json.dumps(result, ensure_ascii=False)):
                await self._client.expire(results, RETENTION_S)
                await self._client.hincrby(f"bulk:counts:{batch_id}", "completed" if answered(result) else "failed")
                self.observe.request(answered(result))
                await self._client.expire(f"bulk:counts:{batch_id}", RETENTION_S)
        elif record is not None and record.status == "cancelling":
            await self._client.hsetnx(f"bulk:skipped:{batch_id}", index, 1)
            await self._client.expire(f"bulk:skipped:{batch_id}", RETENTION_S)
        await self._client.xack(STREAM, GROUP, entry_id)
        await self._client.xdel(STREAM, entry_id)
        await self._maybe_finish(batch_id)

    async def _maybe_finish(self, batch_id: str) -> None:
        """Complete (or end as cancelled) a batch whose every line is answered or skipped; once, by whoever gets
        there first."""
        record = await self._read(batch_id)
        if record is None or record.status not in ("in_progress", "cancelling"):
            return
        done = await self._client.hlen(f"bulk:results:{batch_id}")
        skipped = await self._client.hlen(f"bulk:skipped:{batch_id}")
        cancelling = record.status == "cancelling"
        if done + skipped < record.counts.total:
            return
        if not await self._client.set(f"bulk:final:{batch_id}", self._consumer, nx=True, ex=RETENTION_S):
            return
        stored = await self._client.hgetall(f"bulk:results:{batch_id}")
        entries = [json.loads(stored[key]) for key in sorted(stored, key=int)]
        files = {
            kind: (await self.add_file(record.owner, name, "batch_output", data)).id
            for kind, (name, data) in result_files(record, entries).items()
        }
        output, error = files.get("output"), files.get("error")
        final = record.entering("finalizing").entering(
            "cancelled" if cancelling else "completed", output_file_id=output, error_file_id=error
        )
        await self._move(replace(final, counts=record.counts), ("in_progress", "cancelling"))
        self.observe.batch(final.status)
