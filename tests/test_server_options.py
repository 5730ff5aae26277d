"""How the service and the stage servers run (`stage_protocol.server.command`): each request from its own context,
over a real server (`UVICORN_OPTIONS`), and megabyte buffers kept in glibc's heap (`keep_large_buffers_in_heap`).

On asyncio's own event loop (the one uvicorn runs where uvloop is not installed), a request body over 64 KiB makes
uvicorn pause and resume reading from inside that request's task, and the connection's next request then started
with the first one's context variables (CPython issue 140947): its deadline, long past, failed the next request at
once as `vision_unavailable` where the vision stage is remote. Both HTTP parsers uvicorn offers are checked."""

from __future__ import annotations

import base64
import io
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
import pytest
from PIL import Image

from orchestrator.api.app import create_app
from orchestrator.observability import logs
from orchestrator.settings import CacheSettings, LimitSettings, RouterSettings, Settings
from orchestrator.stages import deadline
from orchestrator.wiring import Backends
from reasoning_stage.none import NoneReasoningBackend
from stage_protocol.server.command import UVICORN_OPTIONS
from tests.fakes import FakeVision
from tests.servers import serving
from vision_stage.types import VisionRequest, VisionResult

DEADLINE_S = 2.0


@dataclass
class DeadlineSpy(FakeVision):
    """Notes how much of the request's deadline is left, and its id, when the vision stage is called."""

    seen: list[tuple[float, str | None]] = field(default_factory=list)

    async def generate(self, request: VisionRequest) -> VisionResult:
        self.seen.append((deadline.remaining(), logs.request_id.get()))
        return await super().generate(request)


def large_png() -> bytes:
    """A PNG of about 200 KB (noise does not compress): its request body is well over 64 KiB."""
    image = Image.effect_noise((256, 256), 64).convert("RGB")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_a_large_request_leaves_nothing_of_its_context_to_the_next_on_its_connection(http: str) -> None:
    settings = Settings(
        router=RouterSettings(kind="keyword"),
        cache=CacheSettings(enabled=False),
        limits=LimitSettings(request_deadline_s=DEADLINE_S, fallback_reserve_s=0.1),
    )
    vision = DeadlineSpy()
    app = create_app(settings, Backends(vision=vision, reasoning=NoneReasoningBackend()))
    large = {"image_base64": base64.b64encode(large_png()).decode(), "question": "What is the total?"}
    assert len(large["image_base64"]) > 3 * 65536
    with serving(app, loop="asyncio", http=http, **UVICORN_OPTIONS) as server, httpx.Client() as client:
        first = client.post(f"{server.url}/v1/analyze", json=large, timeout=10)
        assert first.status_code == 200, first.text
        time.sleep(DEADLINE_S + 0.2)  # the first request's deadline is now past
        second = client.post(f"{server.url}/v1/analyze", json=large, timeout=10)
        assert second.status_code == 200, second.text
        assert second.headers["x-request-id"] != first.headers["x-request-id"]
    ids = [first.headers["x-request-id"], second.headers["x-request-id"]]
    assert [request_id for _, request_id in vision.seen] == ids
    assert all(DEADLINE_S / 2 < left <= DEADLINE_S for left, _ in vision.seen), vision.seen  # 0: an earlier one's


MAPPED_APART = """
import ctypes, sys
from stage_protocol.server.command import keep_large_buffers_in_heap

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "kept":
    assert keep_large_buffers_in_heap()
before = libc.mallinfo2().hblkhd
buffers = [bytearray(8 << 20) for _ in range(3)]
print((libc.mallinfo2().hblkhd - before) >> 20)
"""
"""Prints how many MiB of three 8 MiB buffers glibc mapped apart from its heap (`mallinfo2().hblkhd`)."""


def _has_mallinfo2() -> bool:
    import ctypes

    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc" or not _has_mallinfo2(),
    reason="glibc 2.33 or later only (mallinfo2)",
)
def test_megabyte_buffers_come_from_the_heap_once_kept_there() -> None:
    def mapped_apart(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", MAPPED_APART, mode], capture_output=True, text=True, check=True)
        return int(run.stdout)

    assert mapped_apart("default") >= 8  # glibc maps them apart (24: its threshold has not adapted yet)
    assert mapped_apart("kept") == 0


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc" or not _has_mallinfo2(),
    reason="glibc 2.33 or later only (mallinfo2)",
)
def test_glibc_s_own_threshold_variables_leave_the_heap_as_the_operator_set_it() -> None:
    """With either variable set (to 1 MiB), or the tunable, the 8 MiB buffers stay mapped apart: the 64 MiB thresholds
    were not set."""
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith("MALLOC_") and name != "GLIBC_TUNABLES"
    }
    settings = [
        {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)},
        {"MALLOC_TRIM_THRESHOLD_": str(1 << 20)},
        {"GLIBC_TUNABLES": f"glibc.malloc.mmap_threshold={1 << 20}"},
    ]
    for threshold in settings:
        variable = next(iter(threshold))
        run = subprocess.run(
            [sys.executable, "-c", MAPPED_APART.replace("assert keep_large", "assert not keep_large"), "kept"],
            capture_output=True,
            text=True,
            check=True,
            env=environment | threshold,
        )
        assert int(run.stdout) == 24, variable
