"""The tiny checkpoint, built once for the package and loaded with the production `from_pretrained` code, and the
engines and backend over it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.glm_vision.helpers import SMALL_ENGINE, TINY_MAX_TOKENS
from tests.tiny_glm4v import build_tiny_glm4v
from vision_stage.glm import GlmVisionBackend
from vision_stage.glm_engine import GlmEngine


@pytest.fixture(scope="package")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_glm4v(tmp_path_factory.mktemp("glm4v") / "tiny", max_visual_tokens=TINY_MAX_TOKENS)


@pytest.fixture(scope="package")
def engine(checkpoint: Path) -> GlmEngine:
    return GlmEngine.load(str(checkpoint), device="cpu", dtype="auto", local_files_only=True)


@pytest.fixture
def backend(engine: GlmEngine, checkpoint: Path) -> GlmVisionBackend:
    return GlmVisionBackend(engine, model=str(checkpoint), device="cpu", max_new_tokens=8)


@pytest.fixture(scope="package")
def batched_engine(checkpoint: Path) -> Iterator[GlmEngine]:
    """The same checkpoint loaded again, with the batching engine started on its model."""
    loaded = GlmEngine.load(str(checkpoint), device="cpu", dtype="auto", local_files_only=True, batching=SMALL_ENGINE)
    yield loaded
    loaded.close()
