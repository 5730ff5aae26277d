from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from orchestrator.observability.audit import AuditLog, AuditMiddleware
from orchestrator.observability.record import RequestRecord, digest


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir()}


def holds(path: Path, text: str) -> bool:
    return path.exists() and text in path.read_text(encoding="utf-8")


async def test_concurrent_records_are_all_written_in_few_group_commits(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    await log.start()
    try:
        await asyncio.gather(*(log.write({"n": n}) for n in range(200)))
    finally:
        await log.aclose()
    assert sorted(int(str(r["n"])) for r in lines(tmp_path / "audit.jsonl")) == list(range(200))
    assert 1 <= log.batches < 200


async def test_the_log_rotates_by_size_keeping_the_configured_backups(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=200, backups=2)
    await log.start()
    try:
        for n in range(30):
            await log.write({"n": n, "pad": "x" * 40})
    finally:
        await log.aclose()
    files = sizes(tmp_path)
    assert sorted(files) == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert all(size <= 200 for size in files.values())
    newest = lines(path)
    assert newest[-1]["n"] == 29
    assert lines(tmp_path / "audit.jsonl.1")[-1]["n"] == int(str(newest[0]["n"])) - 1


def test_digests_name_their_algorithm_and_never_hold_the_input() -> None:
    assert digest("total?") == digest(b"total?")
    assert digest("total?").startswith("sha256:")
    assert "total" not in digest("total?")


def app_with_audit(path: Path, on_disk_before_last_byte: list[bool]) -> Starlette:
    log = AuditLog(path)

    async def answer(request: Request) -> Response:
        RequestRecord.of(request.scope).analysis.update(route="vision_only", answer=digest("42"))
        return JSONResponse({"answer": "42"})

    async def stream(request: Request) -> Response:
        async def events() -> object:
            yield b"data: 1\n\n"
            RequestRecord.of(request.scope).analysis["outcome"] = "streamed"
            on_disk_before_last_byte.append(holds(path, "streamed"))
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")  # type: ignore[arg-type]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await log.start()
        yield
        await log.aclose()

    app = Starlette(
        routes=[Route("/v1/answer", answer, methods=["POST"]), Route("/v1/stream", stream), Route("/health", answer)],
        lifespan=lifespan,
    )
    app.add_middleware(AuditMiddleware, log=log)
    return app


def test_the_middleware_writes_one_record_per_request_before_the_response_completes(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    seen: list[bool] = []
    with TestClient(app_with_audit(path, seen)) as client:
        assert client.post("/v1/answer").json() == {"answer": "42"}
        assert len(lines(path)) == 1  # on disk by the time the client has the body
        assert client.get("/v1/stream").text.endswith("[DONE]\n\n")
        client.get("/health")  # not an API path: not audited
    records = lines(path)
    assert [r["endpoint"] for r in records] == ["POST /v1/answer", "GET /v1/stream"]
    assert records[0]["status"] == 200
    assert records[0]["route"] == "vision_only"
    assert records[0]["answer"] == digest("42")
    assert records[1]["outcome"] == "streamed"
    assert seen == [False]  # the stream's record was written only as its last message went out
