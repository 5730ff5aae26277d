"""Real HTTP servers for tests: an ASGI app under uvicorn on 127.0.0.1, port 0, in a background thread.

    with serving(create_app(backend, served_model_name="m")) as server:
        client = openai_client(server)

The app runs its lifespan (so it closes its backends on exit) in the server thread's own event loop, which lets sync
and async clients alike talk to it from the test. Leaving the block stops the server and waits for it.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from openai import OpenAI
from openai.types.chat import ChatCompletionContentPartParam, ChatCompletionMessageParam
from starlette.types import ASGIApp


@dataclass(frozen=True)
class RunningServer:
    url: str
    """`http://127.0.0.1:PORT`, no trailing slash."""

    @property
    def base_url(self) -> str:
        """The OpenAI client's `base_url`."""
        return f"{self.url}/v1"


def unused_port() -> int:
    """A loopback port nothing listens on (free when asked; nothing keeps it free)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@contextmanager
def serving(app: ASGIApp, *, startup_timeout_s: float = 30.0, **options: Any) -> Iterator[RunningServer]:
    """Serve `app` until the block ends (`options`: more of uvicorn's); a failed startup (the lifespan raising)
    raises here."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", timeout_graceful_shutdown=5, **options
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    try:
        _wait_started(server, thread, startup_timeout_s)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield RunningServer(f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _wait_started(server: uvicorn.Server, thread: threading.Thread, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the test server exited during startup; its log says why")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the test server did not start within {timeout_s} s")
        time.sleep(0.005)


def openai_client(server: RunningServer) -> OpenAI:
    """The official sync client for `server`, with retries off (a test wants the first answer)."""
    return OpenAI(base_url=server.base_url, api_key="x", max_retries=0)


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a server-sent-events body, `[DONE]` included."""
    return [event.removeprefix("data: ") for event in response.text.split("\n\n") if event.startswith("data: ")]


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_message(text: str, *urls: str) -> list[ChatCompletionMessageParam]:
    """One user message: an `image_url` part per URL, then `text`."""
    parts: list[ChatCompletionContentPartParam] = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def reset(fake: Any, fresh: Any) -> None:
    """Put a dataclass fake shared by a module's tests back in the state of `fresh`."""
    for attribute in dataclasses.fields(fresh):
        setattr(fake, attribute.name, getattr(fresh, attribute.name))


def start_orchestrator(port: int, log: Path, **env: str) -> subprocess.Popen[bytes]:
    """`python -m orchestrator serve` on `port` with the `ORCH_…` variables `env`, its output into `log`."""
    command = [sys.executable, "-m", "orchestrator", "serve", "--port", str(port)]
    with log.open("wb") as output:
        return subprocess.Popen(command, env={**os.environ, **env}, stdout=output, stderr=subprocess.STDOUT)


def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 20) -> None:
    """Until `url`'s `/health` answers 200; the process's log in the error when it exits or does not start."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the orchestrator exited:\n" + log.read_text(errors="replace"))
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise TimeoutError("the orchestrator did not start:\n" + log.read_text(errors="replace"))
