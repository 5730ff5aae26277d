"""The OpenAI Batch API, driven with the official `openai` client: files in, a batch run in the background through
the service's own endpoints, answers and errors read back as files; ownership, validation and cancellation."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from pydantic import SecretStr

from orchestrator.api.app import create_app
from orchestrator.settings import BatchSettings, Settings
from orchestrator.wiring import Backends
from tests.fakes import FakeReasoning, FakeVision
from tests.images import png_bytes
from tests.servers import data_url, serving
from vision_stage.types import VisionRequest, VisionResult

KEYS = ("batch-key-a-0123456789", "batch-key-b-0123456789")
AUTH = {"Authorization": f"Bearer {KEYS[0]}"}


def chat_line(custom_id: str, question: str = "What is the total?", *, image: bool = True) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": question}]
    if image:
        content.append({"type": "image_url", "image_url": {"url": data_url(png_bytes())}})
    body = {"model": "auto", "messages": [{"role": "user", "content": content}]}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def jsonl(*lines: object) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


@contextmanager
def refused(kind: type[openai.APIStatusError], error_type: str) -> Iterator[None]:
    """The block raises `kind` with the service's error `type`."""
    with pytest.raises(kind) as caught:
        yield
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["type"] == error_type, body


@contextmanager
def service(vision: FakeVision | None = None, concurrency: int = 4) -> Iterator[tuple[OpenAI, OpenAI]]:
    settings = Settings(api_keys=SecretStr(",".join(KEYS)), batch=BatchSettings(concurrency=concurrency))
    app = create_app(settings, Backends(vision or FakeVision(), FakeReasoning()))
    with serving(app) as server:
        yield tuple(OpenAI(base_url=server.base_url, api_key=key, max_retries=0) for key in KEYS)  # type: ignore[misc]


def finished(client: OpenAI, batch_id: str, timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        time.sleep(0.05)
    raise TimeoutError(f"batch {batch_id} still {batch.status}")


def test_a_batch_runs_and_its_answers_and_errors_come_back_as_files() -> None:
    with service() as (client, _):
        lines = [chat_line("a"), chat_line("b", "Is it paid?"), chat_line("no-image", image=False)]
        uploaded = client.files.create(file=("requests.jsonl", jsonl(*lines)), purpose="batch")
        assert (uploaded.purpose, uploaded.bytes, uploaded.filename) == ("batch", len(jsonl(*lines)), "requests.jsonl")
        assert client.files.retrieve(uploaded.id).id == uploaded.id
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"job": "x"}
        )
        assert batch.status in ("validating", "in_progress")
        done = finished(client, batch.id)
        assert done.status == "completed", done
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (3, 2, 1)
        assert done.metadata == {"job": "x"}
        assert done.completed_at is not None
        output = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
        errors = [json.loads(line) for line in client.files.content(done.error_file_id).text.splitlines()]
        listed = client.batches.list(limit=5)
        metrics = httpx.get(f"{client.base_url}".removesuffix("/v1/") + "/metrics", headers=AUTH, timeout=10).text
    assert sorted(entry["custom_id"] for entry in output) == ["a", "b"]
    for entry in output:
        assert entry["response"]["status_code"] == 200
        assert entry["response"]["body"]["object"] == "chat.completion"
        assert entry["response"]["body"]["choices"][0]["message"]["content"]
        assert entry["response"]["request_id"]
        assert entry["id"].startswith("batch_req_")
    assert [(entry["custom_id"], entry["response"]["status_code"]) for entry in errors] == [("no-image", 400)]
    assert errors[0]["response"]["body"]["error"]["type"] == "image_missing"
    assert [batch.id for batch in listed.data] == [done.id]
    assert 'orchestrator_batch_requests_total{result="answered"} 2.0' in metrics
    assert 'orchestrator_batch_requests_total{result="failed"} 1.0' in metrics
    assert 'orchestrator_batches_total{status="completed"} 1.0' in metrics


def test_a_bad_input_file_fails_the_batch_line_by_line_and_nothing_runs() -> None:
    vision = FakeVision()
    with service(vision) as (client, _):
        bad = jsonl(chat_line("a"), {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}},
                    {"custom_id": "c", "method": "GET", "url": "/v1/chat/completions", "body": {}}, [1, 2])  # fmt: skip
        uploaded = client.files.create(file=("bad.jsonl", bad + b"not json\n"), purpose="batch")
        done = finished(client, client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h").id)  # fmt: skip
    assert done.status == "failed"
    assert [(error.line, error.code) for error in done.errors.data] == [(n, "invalid_request") for n in (2, 3, 4, 5)]
    assert "used twice" in done.errors.data[0].message
    assert vision.requests == []


def test_files_and_batches_belong_to_their_key_and_bad_requests_are_clear_4xx() -> None:
    with service() as (mine, theirs):
        uploaded = mine.files.create(file=("in.jsonl", jsonl(chat_line("a"))), purpose="batch")
        batch = mine.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
        with refused(openai.NotFoundError, "file_not_found"):
            theirs.files.retrieve(uploaded.id)
        with refused(openai.NotFoundError, "file_not_found"):
            theirs.files.content(uploaded.id)
        with refused(openai.NotFoundError, "batch_not_found"):
            theirs.batches.retrieve(batch.id)
        with refused(openai.NotFoundError, "file_not_found"):
            theirs.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert theirs.batches.list().data == []
        with refused(openai.BadRequestError, "invalid_batch"):
            mine.files.create(file=("in.jsonl", b"{}"), purpose="fine-tune")
        with refused(openai.BadRequestError, "invalid_batch"):
            mine.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
        with refused(openai.NotFoundError, "not_found"):  # no route takes slashes in an id
            mine.files.retrieve("../../etc/passwd")
        with refused(openai.NotFoundError, "file_not_found"):
            mine.files.retrieve("file_%2e%2e")
        finished(mine, batch.id)


@dataclass
class GatedVision(FakeVision):
    """Holds every request until `gate` is set."""

    gate: threading.Event = field(default_factory=threading.Event)

    async def generate(self, request: VisionRequest) -> VisionResult:
        await asyncio.to_thread(self.gate.wait, 30)
        return await super().generate(request)


def test_a_cancelled_batch_stops_taking_requests_and_keeps_what_it_answered() -> None:
    vision = GatedVision()
    with service(vision, concurrency=1) as (client, _):
        uploaded = client.files.create(
            file=("in.jsonl", jsonl(*(chat_line(f"r{n}") for n in range(4)))), purpose="batch"
        )
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 10
        while not vision.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        cancelling = client.batches.cancel(batch.id)
        assert cancelling.status == "cancelling"
        vision.gate.set()
        done = finished(client, batch.id)
        output = client.files.content(done.output_file_id).text.splitlines()
    assert done.status == "cancelled"
    assert done.cancelled_at is not None
    assert (done.request_counts.total, done.request_counts.completed) == (4, 1)
    assert len(output) == 1


class _CancelReportedAsConnectionLoss:
    """A Redis client whose blocking read, cancelled, raises a `ConnectionError` instead of the cancellation (as a
    client library can when a cancellation races its own timeout or disconnect), on each worker's first read; counts
    the reads."""

    def __init__(self, workers: int) -> None:
        self.reads = 0
        self.converting = workers

    async def xautoclaim(self, *args: Any, **kwargs: Any) -> Any:
        import redis

        self.reads += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if self.converting:
                self.converting -= 1
                raise redis.exceptions.ConnectionError("Connection closed by server.") from None
            raise

    async def aclose(self) -> None:
        pass


async def test_closing_stops_the_shared_batch_workers_however_the_client_reports_the_cancellation() -> None:
    from orchestrator.bulk.shared import SharedBatches

    batches = SharedBatches(create_app(Settings()), "redis://127.0.0.1:9/0", workers=2, visibility_s=60.0)
    client = _CancelReportedAsConnectionLoss(workers=2)
    batches._client = client  # type: ignore[assignment]
    batches._grouped = True
    await batches.start()
    await asyncio.sleep(0.05)
    closing = asyncio.create_task(batches.aclose())
    done, _ = await asyncio.wait({closing}, timeout=5.0)
    try:
        assert closing in done, "a replica stopping waited on its batch workers"
        assert client.reads == 2
        assert all(task.done() for task in batches._tasks)
    finally:
        for task in (closing, *batches._tasks):
            task.cancel()
