"""End to end on loopback: `python -m orchestrator serve` on the embedded models, driven over real HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.servers import unused_port

RECEIPT = Path(__file__).resolve().parent / "fixtures" / "receipt.png"
pytestmark = pytest.mark.slow


@dataclass
class Server:
    url: str
    process: subprocess.Popen[str]
    log: list[str] = field(default_factory=list)


def wait_ready(server: Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError("the server exited:\n" + "".join(server.log))
        try:
            if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the server did not become ready:\n" + "".join(server.log))


@pytest.fixture(scope="module")
def server(embedded_model_cache: Path) -> Iterator[Server]:
    port = unused_port()
    env = {
        **os.environ,
        "ORCH_REASONING__CACHE_DIR": str(embedded_model_cache),
        "ORCH_REASONING__MAX_NEW_TOKENS": "40",
        "HF_HUB_OFFLINE": "1",
    }
    command = [sys.executable, "-m", "orchestrator", "serve", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    running = Server(f"http://127.0.0.1:{port}", process)
    stdout = process.stdout
    assert stdout is not None
    drain = threading.Thread(target=lambda: running.log.extend(iter(stdout.readline, "")), daemon=True)
    drain.start()
    try:
        wait_ready(running, timeout_s=300)
        yield running
    finally:
        process.terminate()
        process.wait(timeout=30)


def analyze(server: Server, question: str, data: bytes | None = None) -> httpx.Response:
    files = {"image": ("receipt.png", data if data is not None else RECEIPT.read_bytes(), "image/png")}
    return httpx.post(f"{server.url}/v1/analyze", files=files, data={"question": question}, timeout=300)


def test_startup_logs_name_the_backends_and_their_load_times(server: Server) -> None:
    log = "".join(server.log)
    assert "loaded vision backend 'ocr'" in log
    assert "loaded reasoning backend 'local'" in log
    assert " in " in log.split("loaded reasoning backend 'local'")[1].splitlines()[0]


def test_a_perception_question_is_answered_from_the_receipt_text(server: Server) -> None:
    response = analyze(server, "What is the total?")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["mode"] == "vision_only"
    lines = [line["text"].replace(" ", "") for line in body["vision"]["structured"]["text_lines"]]
    assert lines[0] == "TOTAL54.06"  # most relevant first
    assert {"BLUEBOTTLECAFE", "谢谢惠顾", "Subtotal51.00"} <= set(lines)
    assert "54.06" in body["answer"]
    assert body["vision"]["backend"] == "ocr"


def test_a_reasoning_question_goes_through_the_llm_and_says_so(server: Server) -> None:
    response = analyze(server, "Why is the total higher than the subtotal?")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["mode"] == "vision_then_reasoning"
    assert "why" in body["route"]["reason"]
    assert body["reasoning"]["backend"] == "local"
    assert "SmolLM2" in body["reasoning"]["model"]
    assert body["answer"].strip()
    assert body["answer"] == body["reasoning"]["answer"]
    assert body["usage"]["completion_tokens"] > 0
    assert body["degraded"] is False


def test_bad_input_gets_a_4xx_and_the_server_keeps_serving(server: Server) -> None:
    response = analyze(server, "What is the total?", data=b"definitely not an image")
    assert response.status_code == 415
    assert response.json()["error"]["type"] == "image_unsupported"
    assert httpx.get(f"{server.url}/health", timeout=5).json() == {"status": "ok"}
