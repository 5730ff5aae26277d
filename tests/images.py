"""Small images made in memory for tests."""

from __future__ import annotations

import io

from PIL import Image

from vision_stage.images import ImageLimits, decode_image
from vision_stage.types import DecodedImage


def png_bytes(size: tuple[int, int] = (64, 48), color: str = "white", mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def image_bytes(format: str, size: tuple[int, int] = (64, 48), mode: str = "RGB", color: object = "white") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format=format)  # type: ignore[arg-type]
    return buffer.getvalue()


def decoded(size: tuple[int, int] = (64, 48)) -> DecodedImage:
    return decode_image(png_bytes(size), ImageLimits())
