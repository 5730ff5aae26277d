"""The gateway benchmark's bare hop (`bench/bare_gateway.py`) passes a chat request's bytes to the stage and the
stage's answer back unchanged, or the floor it stands for would be a floor of something else."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench import fake_stage
from bench.gateway_load import Kind, png
from bench.processes import base_env, free_port, spawn, stop, wait_ready


@pytest.fixture(scope="module")
def stage_and_hop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    logs: Path = tmp_path_factory.mktemp("bare-gateway")
    core = min(os.sched_getaffinity(0))
    stage, stage_port = fake_stage.start(core, logs)
    hop_port = free_port()
    stage_url, hop_url = f"http://127.0.0.1:{stage_port}", f"http://127.0.0.1:{hop_port}"
    started = [stage]
    try:
        argv = [sys.executable, "-m", "bench.bare_gateway", str(hop_port), stage_url]
        hop, hop_log = spawn("bare", argv, base_env(), core, logs)
        started.append(hop)
        wait_ready("bare", hop, f"{hop_url}/health", hop_log, 60.0)
        yield stage_url, hop_url
    finally:
        for process in reversed(started):
            stop(process)


@pytest.mark.parametrize("stream", [False, True])
def test_the_bare_hop_answers_as_the_stage_does(stage_and_hop: tuple[str, str], stream: bool) -> None:
    stage_url, hop_url = stage_and_hop
    body = json.loads(Kind("tiny", png(1, 1), (1, 1)).body) | {"stream": stream}
    raw = json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    direct = httpx.post(f"{stage_url}/v1/chat/completions", content=raw, headers=headers, trust_env=False)
    through = httpx.post(f"{hop_url}/v1/chat/completions", content=raw, headers=headers, trust_env=False)
    assert direct.status_code == 200
    assert (through.status_code, through.content) == (direct.status_code, direct.content)
    assert through.headers["content-type"] == direct.headers["content-type"]
    seen = httpx.get(f"{stage_url}/bench/last", trust_env=False).json()
    assert (seen["bytes"], seen["sha256"]) == (len(raw), hashlib.sha256(raw).hexdigest())  # the body went on unchanged


def test_the_bare_hop_has_no_other_routes(stage_and_hop: tuple[str, str]) -> None:
    _, hop_url = stage_and_hop
    assert httpx.get(f"{hop_url}/v1/chat/completions", trust_env=False).status_code == 404
    assert httpx.post(f"{hop_url}/v1/models", trust_env=False).status_code == 404
