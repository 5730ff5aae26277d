from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ("tests.text_engine", "tests.vision_engine")
"""The tiny text checkpoints' fixtures (`checkpoint`, `chat`) of the text engine's tests, and the tiny GLM-4.6V
model's (`glm`) of the engine's tests on it."""

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def embedded_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache directory for the converted embedded chat model, shared by every test of the session, so the
    packaged GGUF is converted once per run."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A Redis shared by a test module (`tests/redis_server.py`; imported here, not at the top: the GPU machine's
    tests run without the web server's packages)."""
    from tests.redis_server import redis_server

    with redis_server() as (url, _):
        yield url


def pytest_configure(config: pytest.Config) -> None:
    """Triton kernels run by Triton's interpreter, on the CPU (`triton_interpreter`), on a machine without an NVIDIA
    GPU: the switch must be set before Triton is first imported (importing transformers' models does), and on a GPU
    it would put every compiled kernel of the GPU tests through the interpreter."""
    if not Path("/dev/nvidiactl").exists():
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def triton_interpreter() -> None:
    """`batch_engine.decode_attention`'s Triton kernel, run by Triton's interpreter on the CPU; skipped without
    Triton (it comes with torch's CUDA builds) or with the interpreter off (on a machine with a GPU)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (TRITON_INTERPRET)")


@pytest.fixture
def engine_out_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batching engine cannot start: `BatchEngine.start` raises CUDA's out-of-memory error, as it does where the
    slots' KV caches do not fit the device."""
    import torch

    from batch_engine.engine import BatchEngine

    def start(self: BatchEngine) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 5.00 GiB")

    monkeypatch.setattr(BatchEngine, "start", start)
