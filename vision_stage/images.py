"""Decoding and validating uploaded images with Pillow.

This is the one place where Pillow's errors are translated into `vision_stage.errors`.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from vision_stage.errors import ImageCorrupt, ImageEmpty, ImageTooLarge, ImageTooManyPixels, ImageUnsupported
from vision_stage.types import DecodedImage

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
FORWARDABLE_FORMATS = ("JPEG", "PNG")
"""Formats whose upload a remote vision backend may forward as it is (`DecodedImage.source`)."""
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000


def decode_image(data: bytes, limits: ImageLimits) -> DecodedImage:
    """Validate `data` and decode it into RGB pixels, EXIF orientation applied.

    Raises an `ImageRejected` subclass naming what is wrong; never a Pillow error.
    """
    if not data:
        raise ImageEmpty("the image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"the image has {len(data)} bytes; the limit is {limits.max_bytes}")
    image = _open(data, limits)
    oriented = _load(image)
    pixels = _to_rgb(oriented)
    as_sent = oriented is image and pixels is oriented and image.format in FORWARDABLE_FORMATS
    return DecodedImage(
        pixels=pixels,
        format=image.format or "unknown",
        width=pixels.width,
        height=pixels.height,
        byte_size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        source=data if as_sent else None,
    )


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooManyPixels(f"the image declares too many pixels: {exc}") from None
    except UnidentifiedImageError:
        declared = sniff_format(data)
        if declared is not None:
            raise ImageCorrupt(f"the {declared} image is truncated or damaged: its header does not parse") from None
        accepted = ", ".join(ACCEPTED_FORMATS)
        raise ImageUnsupported(f"the bytes are not an image in an accepted format ({accepted})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageCorrupt(f"the image header is damaged: {exc}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageCorrupt(f"the image declares an empty size {width}x{height}")
    if width * height > limits.max_pixels:
        raise ImageTooManyPixels(
            f"the image has {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}"
        )
    return image


def sniff_format(data: bytes) -> str | None:
    """The accepted format whose signature `data` starts with, whether or not the rest parses."""
    if data[:12].startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def _load(image: Image.Image) -> Image.Image:
    """The pixels, turned upright by the EXIF orientation when one other than 1 is set (`image` itself otherwise)."""
    try:
        image.load()
        if image.getexif().get(ExifTags.Base.Orientation, 1) == 1:
            return image
        return ImageOps.exif_transpose(image) or image
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageCorrupt(f"the {image.format} image is truncated or damaged: {exc}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Normalise palette, alpha, CMYK, greyscale and 16-bit images to 8-bit RGB (alpha composited on white)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = _to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    import numpy as np

    values = np.asarray(image, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(scaled.astype(np.uint8), mode="L")
