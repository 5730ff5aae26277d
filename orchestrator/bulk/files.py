"""Batch files and batches on disk, as the OpenAI Batch API names them.

`BulkStore` keeps every file under `<directory>/files/<id>` with its record beside it (`<id>.json`), and every batch's
record under `<directory>/batches/<id>.json`, each written whole to a temporary name and renamed, so that a reader
never sees half a record. Records belong to their owner (an API key's id, or the client address without keys):
another owner's id is not found, exactly as an id that never existed. Nothing here runs requests
(`orchestrator.bulk.runner` does).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from orchestrator.errors import BatchNotFound, FileNotFound

BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
ENDPOINTS = ("/v1/chat/completions", "/v1/analyze")
"""What a batch's requests may call."""


@dataclass(frozen=True)
class FileRecord:
    id: str
    owner: str
    bytes: int
    created_at: int
    filename: str
    purpose: str

    def out(self) -> dict[str, Any]:
        """The OpenAI `file` object."""
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed", "expires_at": None,
                "status_details": None}  # fmt: skip


@dataclass(frozen=True)
class Counts:
    total: int = 0
    completed: int = 0
    failed: int = 0


@dataclass(frozen=True)
class BatchRecord:
    id: str
    owner: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus
    created_at: int
    metadata: dict[str, str] | None = None
    counts: Counts = field(default_factory=Counts)
    errors: tuple[dict[str, Any], ...] = ()
    output_file_id: str | None = None
    error_file_id: str | None = None
    times: dict[str, int] = field(default_factory=dict)
    """When each status was entered (`in_progress_at`, `completed_at`, …)."""

    def out(self) -> dict[str, Any]:
        """The OpenAI `batch` object."""
        stamps = ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": {"object": "list", "data": list(self.errors)} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "expires_at": self.created_at + 24 * 3600,
            **{f"{name}_at": self.times.get(name) for name in stamps},
            "request_counts": asdict(self.counts),
            "metadata": self.metadata,
        }

    def entering(self, status: BatchStatus, **changes: Any) -> BatchRecord:
        return replace(self, status=status, times={**self.times, status: int(time.time())}, **changes)


class BulkStore:
    """Files and batches under `directory` (module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        for folder in ("files", "batches"):
            (directory / folder).mkdir(parents=True, exist_ok=True)

    def add_file(self, owner: str, filename: str, purpose: str, data: bytes) -> FileRecord:
        record = FileRecord(new_id("file"), owner, len(data), int(time.time()), filename, purpose)
        _write(self.directory / "files" / record.id, data)
        _write(self.directory / "files" / f"{record.id}.json", json.dumps(asdict(record)).encode())
        return record

    def file(self, file_id: str, owner: str) -> FileRecord:
        """The owner's file `file_id`; `FileNotFound` otherwise."""
        path = self.directory / "files" / f"{_safe(file_id)}.json"
        try:
            record = FileRecord(**json.loads(path.read_bytes()))
        except (OSError, ValueError, TypeError):
            record = None
        if record is None or record.owner != owner:
            raise FileNotFound(f"no file {file_id!r} of this caller")
        return record

    def content(self, record: FileRecord) -> bytes:
        return (self.directory / "files" / record.id).read_bytes()

    def put_batch(self, record: BatchRecord) -> BatchRecord:
        data = asdict(record)
        _write(self.directory / "batches" / f"{record.id}.json", json.dumps(data).encode())
        return record

    def batch(self, batch_id: str, owner: str) -> BatchRecord:
        """The owner's batch `batch_id`; `BatchNotFound` otherwise."""
        record = self._read_batch(self.directory / "batches" / f"{_safe(batch_id)}.json")
        if record is None or record.owner != owner:
            raise BatchNotFound(f"no batch {batch_id!r} of this caller")
        return record

    def batches(self, owner: str) -> list[BatchRecord]:
        """The owner's batches, newest first."""
        records = (self._read_batch(path) for path in (self.directory / "batches").glob("batch_*.json"))
        mine = [record for record in records if record is not None and record.owner == owner]
        return sorted(mine, key=lambda record: (record.created_at, record.id), reverse=True)

    @staticmethod
    def _read_batch(path: Path) -> BatchRecord | None:
        try:
            data = json.loads(path.read_bytes())
            data["counts"] = Counts(**data["counts"])
            data["errors"] = tuple(data["errors"])
            return BatchRecord(**data)
        except (OSError, ValueError, TypeError, KeyError):
            return None


def new_batch(
    owner: str, endpoint: str, input_file_id: str, window: str, metadata: dict[str, str] | None
) -> BatchRecord:
    return BatchRecord(new_id("batch"), owner, endpoint, input_file_id, window, "validating", int(time.time()),
                       metadata)  # fmt: skip


def new_id(kind: str) -> str:
    return f"{kind}_{secrets.token_hex(12)}"


def _safe(identifier: str) -> str:
    """An id as a file name: anything but letters, digits and `_` makes it one that cannot exist."""
    return identifier if identifier.replace("_", "").isalnum() else "_"


def _write(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    temporary.write_bytes(data)
    os.replace(temporary, path)
