"""Typed settings, read from the environment (prefix `ORCH_`, nested with `__`).

Examples: `ORCH_VISION__BACKEND=ocr`, `ORCH_REASONING__BACKEND=local`, `ORCH_REASONING__MODEL=/models/glm-4-9b`,
`ORCH_LIMITS__MAX_IMAGE_BYTES=10485760`. Nothing here is built at import time: `Settings()` reads the environment
when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VisionSettings(_Section):
    backend: Literal["ocr"] = "ocr"
    """Which vision backend answers: `ocr` is the embedded default (RapidOCR + image tags, CPU, no download)."""
    tags: bool = True
    """Run the EfficientNet-Lite0 ImageNet tagger alongside OCR."""


class ReasoningSettings(_Section):
    backend: Literal["local", "none"] = "local"
    """`local`: a transformers causal LM in this process; `none`: vision-only by design."""
    model: str | None = None
    """A local directory or hub id; unset means the packaged SmolLM2-135M-Instruct."""
    device: str = "cpu"
    dtype: str = "auto"
    allow_download: bool = False
    """Let `model` be fetched from a model hub when it is not on disk. Off by default: nothing downloads."""
    cache_dir: Path | None = None
    """Where the converted embedded model is cached; unset means the user cache directory."""
    max_new_tokens: int = Field(default=192, ge=1, le=8192)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    """0 means greedy decoding."""


class LimitSettings(_Section):
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    max_request_bytes: int = Field(default=30 * 1024 * 1024, ge=1)
    """Whole request body; base64 inflates an image by a third, so keep this above 4/3 of `max_image_bytes`."""
    max_question_chars: int = Field(default=2000, ge=1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ORCH_", env_nested_delimiter="__", extra="forbid", frozen=True, validate_default=True
    )

    vision: VisionSettings = VisionSettings()
    reasoning: ReasoningSettings = ReasoningSettings()
    limits: LimitSettings = LimitSettings()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
