"""The audit log keeps its promise when the process dies: `python -m orchestrator serve` with an audit log, under
concurrent load, killed with SIGKILL; every request whose 200 arrived in full has its record in the log, and the log
parses. The stages are fast fakes: the vision stage is a `FaultyServer` on loopback, the reasoning stage is off.

Can the last line be torn? A batch goes to the file in one `write` call, but a write of a large batch may take
several system calls, and the kill can fall between two. Such a batch is not yet fsync'd, so none of its requests has
had its last response byte sent: a torn last line can only belong to a request that did not complete. The test
therefore allows a final partial line, and checks that no completed request is missing. A log reopened after a kill
ends a torn line first, so that it cannot swallow the next record (the second test).
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from orchestrator.observability.audit import AuditLog
from tests.faulty_server import FaultyServer, running
from tests.images import png_bytes
from tests.servers import data_url, start_orchestrator, unused_port, wait_healthy

KEY = "audit-kill-test-key-0123"
WORKERS = 8
TARGET = 200
"""Completed requests to wait for (at most 15 s) before the kill: the log then holds many group commits."""
AT_LEAST = 20


def start_audited(vision_url: str, audit_path: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    return start_orchestrator(
        port,
        log,
        ORCH_VISION__BACKEND="remote",
        ORCH_VISION__BASE_URL=vision_url,
        ORCH_VISION__MODEL="m",
        ORCH_REASONING__BACKEND="none",
        ORCH_ROUTER__KIND="keyword",
        ORCH_AUDIT__PATH=str(audit_path),
        ORCH_API_KEYS=KEY,
        ORCH_RATE_LIMIT__REQUESTS_PER_S="100000",
        ORCH_RATE_LIMIT__BURST="100000",
        ORCH_LOG_LEVEL="warning",
    )


def drive(url: str, completed: list[str], stop: threading.Event) -> None:
    """Post analyses until told to stop or the server is gone; note the request id of each 200 received whole."""
    body = {"question": "What is the total?", "image_url": data_url(png_bytes())}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10) as client:
        while not stop.is_set():
            try:
                response = client.post("/v1/analyze", json=body)
                answer = response.json()
            except (httpx.HTTPError, ValueError):
                return  # killed: this request did not complete
            if response.status_code == 200 and answer["request_id"] == response.headers["x-request-id"]:
                completed.append(answer["request_id"])


def test_every_completed_request_is_in_the_log_after_a_sigkill(tmp_path: Path) -> None:
    audit_path = tmp_path / "audit.jsonl"
    port = unused_port()
    url = f"http://127.0.0.1:{port}"
    completed: list[str] = []
    stop = threading.Event()
    with running(FaultyServer(model="m")) as vision:
        process = start_audited(vision.base_url, audit_path, port, tmp_path / "orchestrator.log")
        try:
            wait_healthy(url, process, tmp_path / "orchestrator.log")
            workers = [threading.Thread(target=drive, args=(url, completed, stop)) for _ in range(WORKERS)]
            for worker in workers:
                worker.start()
            deadline = time.monotonic() + 15
            while len(completed) < TARGET and time.monotonic() < deadline:
                time.sleep(0.02)
            process.send_signal(signal.SIGKILL)  # mid-load: every worker has a request in flight
            process.wait(timeout=10)
        finally:
            stop.set()
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
    for worker in workers:
        worker.join(timeout=15)
    done = list(completed)
    assert len(done) >= AT_LEAST, (tmp_path / "orchestrator.log").read_text(errors="replace")

    *lines, tail = audit_path.read_bytes().split(b"\n")
    records = [json.loads(line) for line in lines]  # every whole line parses; `tail` is b"" or a torn last line
    logged = {record["request_id"] for record in records}
    assert not set(done) - logged, f"{len(set(done) - logged)} completed requests have no record (tail: {tail!r})"
    assert len(logged) == len(records)  # one record per request
    mine = [record for record in records if record["request_id"] in set(done)]
    assert {record["status"] for record in mine} == {200}
    assert {record["key_id"] for record in mine} == {hashlib.sha256(KEY.encode()).hexdigest()[:8]}
    assert all(record["client"].startswith("127.0.0.1:") for record in mine)
    assert all(record["endpoint"] == "POST /v1/analyze" and record["route"] == "vision_only" for record in mine)


async def test_a_log_reopened_after_a_kill_ends_the_torn_line_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"request_id": "a"}\n{"request_id": "b", "sta')
    log = AuditLog(path)
    await log.start()
    try:
        await log.write({"request_id": "c"})
    finally:
        await log.aclose()
    first, torn, last, end = path.read_bytes().split(b"\n")
    assert json.loads(first) == {"request_id": "a"}
    assert torn == b'{"request_id": "b", "sta'
    assert json.loads(last) == {"request_id": "c"}
    assert end == b""
    with pytest.raises(ValueError, match=r"Unterminated|Expecting"):
        json.loads(torn)
