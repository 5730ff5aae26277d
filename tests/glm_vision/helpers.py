"""What the `glm` backend's tests share: small images and requests, the engine settings, and helpers for a batching
engine whose thread the test starts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from PIL import Image

from batch_engine.engine import BatchEngine
from batch_engine.settings import EngineSettings
from tests.raw_http import eventually
from vision_stage.glm import GlmVisionBackend
from vision_stage.glm_engine import REFUSALS, GlmEngine
from vision_stage.types import DecodedImage, ImageFacts, VisionRequest, VisionResult, VisionTask

TINY_MAX_TOKENS = 64
"""The tiny checkpoint's image processor allows 64 visual tokens per image (`size["longest_edge"]`)."""
PIXELS_PER_TOKEN = 2 * 28 * 28
FACTS = ImageFacts(64, 48, "landscape", "PNG", ())


def image(width: int = 64, height: int = 48, color: str = "white") -> DecodedImage:
    return DecodedImage(Image.new("RGB", (width, height), color), "PNG", width, height, 0, "")


def request(
    task: VisionTask = "answer", question: str | None = "what is the total?", *, width: int = 64, height: int = 48
) -> VisionRequest:
    return VisionRequest(image(width, height), question, task=task)


SMALL_ENGINE = EngineSettings(slots=4, max_tokens=512)


def unstarted(engine: GlmEngine) -> GlmEngine:
    """`engine`'s model and codec with a batching engine of its own whose thread is not started yet."""
    return GlmEngine(
        engine.model, engine.codec, name=engine.name, batch=BatchEngine(engine.model, SMALL_ENGINE, REFUSALS)
    )


def unstarted_backend(
    engine: GlmEngine, checkpoint: Path, max_new_tokens: int
) -> tuple[GlmEngine, BatchEngine, GlmVisionBackend]:
    """A backend over `unstarted(engine)`, with that engine and its batching engine."""
    glm = unstarted(engine)
    assert glm.batch is not None
    backend = GlmVisionBackend(glm, model=str(checkpoint), device="cpu", max_new_tokens=max_new_tokens)
    return glm, glm.batch, backend


async def queued(batch: BatchEngine, count: int) -> None:
    """Wait until `count` requests wait in `batch`'s queue."""
    await eventually(lambda: batch.waiting >= count, timeout_s=30)


def same(result: VisionResult) -> VisionResult:
    """`result` without its latency."""
    return dataclasses.replace(result, latency_ms=0.0)
