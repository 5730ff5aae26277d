"""What the tests of the batching engine on the tiny GLM-4.6V model share (`tests/test_batching.py`,
`tests/test_engine_thread.py`, `tests/test_gpu_benches.py`, `tests/test_convolutions.py`): the model loaded as the
`glm` backend loads it on the CPU, its prompts, and an engine over it. Its fixture (`glm`) reaches every test module
through `tests/conftest.py`, built once per module.

The model's text weights are redrawn wider than their initialisation (`sharp`), so that greedy answers vary from
token to token and an off-by-one position, a wrong mask or a row mixed up with another changes the tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from batch_engine.engine import BatchEngine
from batch_engine.settings import EngineSettings
from tests.tiny_glm4v import build_tiny_glm4v
from vision_stage.glm_codec import EncodedPrompt
from vision_stage.glm_engine import REFUSALS, GlmEngine
from vision_stage.types import DecodedImage, VisionRequest

BUDGET = 24


@pytest.fixture(scope="module")
def glm(tmp_path_factory: pytest.TempPathFactory) -> GlmEngine:
    return sharp_glm(tmp_path_factory.mktemp("glm4v"))


def sharp_glm(folder: Path) -> GlmEngine:
    """The tiny GLM-4.6V model loaded as the `glm` backend loads it, on the CPU, its text weights `sharp`."""
    checkpoint = build_tiny_glm4v(folder / "tiny", max_visual_tokens=64)
    engine = GlmEngine.load(str(checkpoint), device="cpu", dtype="auto", local_files_only=True)
    sharp(engine.model)
    return engine


def sharp(model: Any) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2 and ("language_model" in name or "lm_head" in name):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def image(seed: int, width: int = 64, height: int = 48) -> DecodedImage:
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand((height, width, 3), generator=generator) * 255).to(torch.uint8).numpy()
    return DecodedImage(Image.fromarray(pixels), "PNG", width, height, 0, f"sha-{seed}-{width}x{height}")


def prompt(glm: GlmEngine, seed: int, question: str = "what is the total?", **size: int) -> EncodedPrompt:
    return glm.codec.encode(VisionRequest(image(seed, **size), question, task="answer"), thinking=False)


def engine(glm: GlmEngine, **settings: Any) -> BatchEngine:
    return BatchEngine(glm.model, EngineSettings(**{"slots": 4, "max_tokens": 256, **settings}), REFUSALS)


def submit(batch: BatchEngine, encoded: EncodedPrompt, key: str, budget: int = BUDGET) -> Any:
    return batch.submit(encoded.inputs, image_key=key, max_new_tokens=budget)
