"""Two `python -m orchestrator serve` processes sharing one real `redis-server` (`ORCH_STATE__URL`): a session opened
on one replica is used on the other, a key's rate limit holds across both, and Redis stopped mid-load answers as
documented: new questions are still
answered (without a `session_id`), follow-ups by session get 503 `sessions_unavailable` with `Retry-After`, and
nothing else fails. The vision stage is a fast fake on loopback; the reasoning stage is off."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI

from tests.faulty_server import Faults, FaultyServer, running
from tests.images import png_bytes
from tests.redis_server import redis_server
from tests.servers import data_url, start_orchestrator, unused_port, wait_healthy

KEY = "replica-test-key-0123456789"
ANALYZE: Any = "/v1/analyze"
"""A batch endpoint of this service that OpenAI's own list (the client's type) does not have."""
IMAGE = {"question": "What is the total?", "image_url": data_url(png_bytes())}


@dataclass(frozen=True)
class Replica:
    process: subprocess.Popen[bytes]
    client: httpx.Client
    """Holding the API key."""
    url: str


@contextmanager
def started(
    state_url: str, vision_url: str, tmp_path: Path, env: dict[str, str] | None = None
) -> Iterator[list[Replica]]:
    """Two orchestrator processes sharing `state_url` (with the further `ORCH_…` variables `env`)."""
    with ExitStack() as stack:
        running_replicas = []
        for index in range(2):
            port, log = unused_port(), tmp_path / f"replica-{index}.log"
            process = start_orchestrator(
                port,
                log,
                ORCH_STATE__URL=state_url,
                ORCH_VISION__BACKEND="remote",
                ORCH_VISION__BASE_URL=vision_url,
                ORCH_VISION__MODEL="m",
                ORCH_REASONING__BACKEND="none",
                ORCH_ROUTER__KIND="keyword",
                ORCH_API_KEYS=KEY,
                ORCH_LOG_LEVEL="warning",
                **(env or {}),
            )
            stack.callback(process.wait, 10)
            stack.callback(process.terminate)
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, process, log)
            headers = {"Authorization": f"Bearer {KEY}"}
            client = stack.enter_context(httpx.Client(base_url=url, headers=headers, timeout=10))
            running_replicas.append(Replica(process, client, url))
        yield running_replicas


@contextmanager
def replicas(
    state_url: str, vision_url: str, tmp_path: Path, env: dict[str, str] | None = None
) -> Iterator[list[httpx.Client]]:
    """`started`'s replicas as their clients."""
    with started(state_url, vision_url, tmp_path, env) as running_replicas:
        yield [replica.client for replica in running_replicas]


def test_a_session_opened_on_one_replica_is_used_on_the_other(tmp_path: Path) -> None:
    with (
        redis_server() as (state_url, _),
        running(FaultyServer(model="m")) as vision,
        replicas(state_url, vision.base_url, tmp_path) as (first, second),
    ):
        opened = first.post("/v1/analyze", json=IMAGE)
        assert opened.status_code == 200, opened.text
        session = opened.json()["session_id"]
        assert session
        follow_up = second.post("/v1/analyze", json={"question": "And the date?", "session_id": session})
        assert follow_up.status_code == 200, follow_up.text
        assert follow_up.json()["session_id"] == session
        back = first.post("/v1/analyze", json={"question": "And the shop?", "session_id": session})
        assert back.status_code == 200, back.text
        unknown = second.post("/v1/analyze", json={"question": "Hm?", "session_id": "no-such-session"})
        assert (unknown.status_code, unknown.json()["error"]["type"]) == (404, "session_not_found")


def test_redis_stopped_mid_load_fails_only_follow_ups_and_clearly(tmp_path: Path) -> None:
    with (
        redis_server() as (state_url, redis),
        running(FaultyServer(model="m")) as vision,
        replicas(state_url, vision.base_url, tmp_path) as clients,
    ):
        session = clients[0].post("/v1/analyze", json=IMAGE).json()["session_id"]
        redis.terminate()
        redis.wait(timeout=10)

        def ask(index: int) -> httpx.Response:
            client = clients[index % 2]
            if index % 3 == 0:
                return client.post("/v1/analyze", json={"question": "Again?", "session_id": session})
            return client.post("/v1/analyze", json=IMAGE)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(48)))
        upload = clients[1].post("/v1/files", files={"file": ("in.jsonl", b"{}\n")}, data={"purpose": "batch"})
    assert (upload.status_code, upload.json()["error"]["type"]) == (503, "batches_unavailable")
    assert upload.headers["retry-after"] == "1"
    follow_ups, fresh = answers[::3], [answer for index, answer in enumerate(answers) if index % 3]
    for answer in fresh:
        assert answer.status_code == 200, answer.text
        assert answer.json()["session_id"] is None
    for answer in follow_ups:
        assert (answer.status_code, answer.json()["error"]["type"]) == (503, "sessions_unavailable"), answer.text
        assert answer.headers["retry-after"] == "1"


def test_a_key_s_rate_limit_holds_across_both_replicas(tmp_path: Path) -> None:
    limits = {"ORCH_RATE_LIMIT__BURST": "4", "ORCH_RATE_LIMIT__REQUESTS_PER_S": "0.01"}
    with (
        redis_server() as (state_url, _),
        running(FaultyServer(model="m")) as vision,
        replicas(state_url, vision.base_url, tmp_path, limits) as (first, second),
    ):
        answers = [(first, second)[index % 2].post("/v1/analyze", json=IMAGE) for index in range(8)]
    assert [answer.status_code for answer in answers] == [200] * 4 + [429] * 4
    assert {answer.json()["error"]["type"] for answer in answers[4:]} == {"rate_limited"}


def batch_lines(count: int) -> bytes:
    body = {"question": "What is the total?", "image_url": data_url(png_bytes())}
    lines = ({"custom_id": f"r{n}", "method": "POST", "url": "/v1/analyze", "body": body} for n in range(count))
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def finished(client: OpenAI, batch_id: str, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled"):
            return batch
        time.sleep(0.1)
    raise TimeoutError(f"batch {batch_id} still {batch.status}")


def test_a_batch_sent_to_one_replica_is_run_and_read_back_on_the_other(tmp_path: Path) -> None:
    with (
        redis_server() as (state_url, _),
        running(FaultyServer(model="m")) as vision,
        started(state_url, vision.base_url, tmp_path) as (first, second),
    ):
        one, other = (OpenAI(base_url=f"{replica.url}/v1", api_key=KEY, max_retries=0) for replica in (first, second))
        uploaded = one.files.create(file=("in.jsonl", batch_lines(6)), purpose="batch")
        batch = one.batches.create(input_file_id=uploaded.id, endpoint=ANALYZE, completion_window="24h")
        done = finished(other, batch.id)
        output = [json.loads(line) for line in other.files.content(done.output_file_id).text.splitlines()]
        assert [listed.id for listed in other.batches.list().data] == [batch.id]
    assert (done.status, done.request_counts.completed, done.request_counts.failed) == ("completed", 6, 0)
    assert sorted(entry["custom_id"] for entry in output) == [f"r{n}" for n in range(6)]
    assert all(entry["response"]["body"]["answer"] for entry in output)


def test_a_replica_killed_mid_batch_loses_no_item(tmp_path: Path) -> None:
    slow = FaultyServer(model="m", default="trickle", faults=Faults(pieces=4, trickle_delay_s=0.15))
    settings = {"ORCH_BATCH__VISIBILITY_S": "3", "ORCH_LIMITS__REQUEST_DEADLINE_S": "2", "ORCH_BATCH__WORKERS": "1",
                "ORCH_BATCH__CONCURRENCY": "2", "ORCH_CACHE__ENABLED": "false"}  # fmt: skip
    with (
        redis_server() as (state_url, _),
        running(slow) as vision,
        started(state_url, vision.base_url, tmp_path, settings) as (doomed, survivor),
    ):
        client = OpenAI(base_url=f"{survivor.url}/v1", api_key=KEY, max_retries=0)
        uploaded = client.files.create(file=("in.jsonl", batch_lines(12)), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint=ANALYZE, completion_window="24h")
        deadline = time.monotonic() + 20
        while len(slow.received) < 4 and time.monotonic() < deadline:  # both replicas have items under way
            time.sleep(0.05)
        doomed.process.send_signal(signal.SIGKILL)
        doomed.process.wait(timeout=10)
        done = finished(client, batch.id)
        output = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
    assert (done.status, done.request_counts.completed, done.request_counts.failed) == ("completed", 12, 0)
    assert sorted(entry["custom_id"] for entry in output) == sorted(f"r{n}" for n in range(12))
    assert len(slow.received) > 12  # what the killed replica had under way was run again


def test_a_shared_batch_cancelled_on_one_replica_ends_cancelled_with_what_it_answered(tmp_path: Path) -> None:
    slow = FaultyServer(model="m", default="trickle", faults=Faults(pieces=4, trickle_delay_s=0.1))
    settings = {"ORCH_BATCH__WORKERS": "1", "ORCH_BATCH__CONCURRENCY": "1", "ORCH_CACHE__ENABLED": "false"}
    with (
        redis_server() as (state_url, _),
        running(slow) as vision,
        started(state_url, vision.base_url, tmp_path, settings) as (first, second),
    ):
        one, other = (OpenAI(base_url=f"{replica.url}/v1", api_key=KEY, max_retries=0) for replica in (first, second))
        uploaded = one.files.create(file=("in.jsonl", batch_lines(20)), purpose="batch")
        batch = one.batches.create(input_file_id=uploaded.id, endpoint=ANALYZE, completion_window="24h")
        deadline = time.monotonic() + 20
        while len(slow.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert other.batches.cancel(batch.id).status in ("cancelling", "cancelled")
        done = finished(one, batch.id)
        output = one.files.content(done.output_file_id).text.splitlines() if done.output_file_id else []
    assert done.status == "cancelled"
    assert 1 <= done.request_counts.completed < 20
    assert len(output) == done.request_counts.completed
