"""The image as a remote vision server takes it: a `data:` URL, within the server's limits. Pure (CPU-bound).

The upload's own bytes go as they are when they hold exactly the decoded pixels in PNG or JPEG
(`DecodedImage.source`); otherwise the decoded pixels are encoded, as JPEG (quality `JPEG_QUALITY`) when the upload
was a JPEG, since a PNG of a photo is several times larger, and PNG otherwise, lossless so that small text stays
sharp. A server with limits (`stage_protocol.client.dialects.ServerImageLimits`: the GLM open platform takes JPEG or PNG
under 5 MB and 6000 pixels a side) gets an image that fits: scaled down to its side limit, then JPEG at falling
quality and size until it is under its byte limit, with a note saying what was done.
"""

from __future__ import annotations

import io

import pybase64
from PIL import Image

from stage_protocol.client.dialects import ServerImageLimits
from vision_stage.types import DecodedImage

JPEG_QUALITY = 90
_SHRINK_STEPS = ((85, 1.0), (75, 0.8), (70, 0.6), (60, 0.45), (50, 0.3))
"""(JPEG quality, scale) tried in turn for an image over a server's byte limit."""


def image_data_url(image: DecodedImage) -> str:
    """The image as a `data:` URL (module docstring), with no limits."""
    return _data_url(*_payload(image))


def fitted_data_url(image: DecodedImage, limits: ServerImageLimits | None) -> tuple[str, str | None]:
    """The image as a `data:` URL that fits `limits`, and a note when it had to be changed to fit."""
    data, fmt = _payload(image)
    if limits is None or limits.take(image.width, image.height, len(data)):
        return _data_url(data, fmt), None
    pixels = _scaled(image.pixels, min(1.0, limits.max_side / max(image.width, image.height)))
    data = _encoded(pixels, fmt, JPEG_QUALITY)
    for quality, scale in _SHRINK_STEPS:
        if len(data) <= limits.max_bytes:
            break
        fmt = "JPEG"
        data = _encoded(_scaled(pixels, scale), fmt, quality)
    note = (
        f"the {image.width}×{image.height} image was re-encoded to fit the server's limits ({limits.max_side} "
        f"pixels a side, {limits.max_bytes // (1024 * 1024)} MB): sent as {fmt}, {len(data) // 1024} KB"
    )
    return _data_url(data, fmt), note


def _payload(image: DecodedImage) -> tuple[bytes, str]:
    """The bytes to send and their format: the upload as it is, else the pixels encoded."""
    fmt = "JPEG" if image.format == "JPEG" else "PNG"
    return (image.source if image.source is not None else _encoded(image.pixels, fmt, JPEG_QUALITY)), fmt


def _scaled(pixels: Image.Image, scale: float) -> Image.Image:
    if scale >= 1.0:
        return pixels
    return pixels.resize((max(1, round(pixels.width * scale)), max(1, round(pixels.height * scale))))


def _encoded(pixels: Image.Image, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        pixels.convert("RGB").save(buffer, format="JPEG", quality=quality)
    else:
        pixels.save(buffer, format="PNG")
    return buffer.getvalue()


def _data_url(data: bytes, fmt: str) -> str:
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    return f"data:{mime};base64,{pybase64.b64encode(data).decode('ascii')}"
