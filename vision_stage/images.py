"""Decoding and validating uploaded images with Pillow.

This is the one place where Pillow's errors are translated into `vision_stage.errors`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import re
import struct
import warnings
import zlib
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
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHUNK_HEADER = struct.Struct(">I4s")
_CHUNK_TYPE = re.compile(rb"\w{4}")
"""What Pillow accepts as a PNG chunk type."""
_PNG_METADATA_CHUNKS = frozenset({b"eXIf", b"tEXt", b"zTXt", b"iTXt"})
"""The chunks an EXIF orientation can come from (eXIf; Pillow reads XMP and raw EXIF profiles from text chunks)."""
_PLAIN_PNG_CHUNKS = {b"sRGB": 1, b"gAMA": 4, b"pHYs": 9, b"cHRM": 32}
"""Chunks that may come before a plain PNG's pixels (`_plain_png_size`), each with the length the format gives it:
what libpng and most encoders write, and what Pillow reads without failing at those lengths."""
_IHDR = struct.Struct(">IIBBBB")
"""A PNG header's width, height, bit depth, colour type, compression and filter method, as the format lays them out."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000


def decode_image(data: bytes, limits: ImageLimits) -> DecodedImage:
    """Validate `data` and decode it into RGB pixels, EXIF orientation applied.

    An RGB PNG with no orientation to apply (one a remote backend forwards as it is) is checked for structure only
    (every chunk's length and CRC, up to IEND), not inflated: its pixels are decoded on first access to
    `DecodedImage.pixels`, which raises `ImageCorrupt` then if they do not decode; a plain one (`_plain_png_size`) is
    not even opened with Pillow. Every other image is decoded here.

    Raises an `ImageRejected` subclass naming what is wrong; never a Pillow error.
    """
    if not data:
        raise ImageEmpty("the image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"the image has {len(data)} bytes; the limit is {limits.max_bytes}")
    header = _png_header(data)
    walked = _walked(data) if header is not None and header[2:4] == (8, 2) else None  # 8-bit RGB: walked once
    plain = _plain_png_size(header, limits, walked) if header is not None and walked is not None else None
    if plain is not None:
        return _undecoded_png(data, limits, plain)
    image = _open(data, limits)
    if image.format == "PNG" and image.mode == "RGB" and _lazy_png(image, walked or _walked(data)):
        return _undecoded_png(data, limits, image.size)
    oriented = _load(image)
    pixels = _to_rgb(oriented)
    as_sent = oriented is image and pixels is oriented and image.format in FORWARDABLE_FORMATS
    return DecodedImage(
        pixels,
        format=image.format or "unknown",
        width=pixels.width,
        height=pixels.height,
        byte_size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        source=data if as_sent else None,
    )


def declared_pixels(data: bytes) -> int | None:
    """How many pixels `data`'s header declares, read without decoding anything; None when it does not say (not an
    image, a damaged header, a bomb). A hint for scheduling the decoding, never a check: `decode_image` judges."""
    header = _png_header(data)
    if header is not None:
        return header[0] * header[1]
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
            width, height = image.size
    except Exception:  # whatever is wrong, `decode_image` says so precisely
        return None
    return width * height


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


def _lazy_png(image: Image.Image, walked: _PngChunks) -> bool:
    """Whether an RGB PNG's pixels may wait: its structure checks out whole (a PNG that does not is decoded at once,
    and Pillow judges it, as for every other image) and there is no orientation to apply."""
    return walked.whole and _png_upright(image, walked.after)


def _undecoded_png(data: bytes, limits: ImageLimits, size: tuple[int, int]) -> DecodedImage:
    decode = functools.partial(_decode_pixels, data, limits, size)
    return DecodedImage(decode, "PNG", size[0], size[1], len(data), hashlib.sha256(data).hexdigest(), data)


def _png_header(data: bytes) -> tuple[int, int, int, int, int, int] | None:
    """The fields of `_IHDR` when `data` starts as a PNG with its header where the format puts it (the first chunk);
    None otherwise. Nothing else is looked at."""
    if len(data) < 16 + _IHDR.size or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    return _IHDR.unpack_from(data, 16)


def _plain_png_size(
    header: tuple[int, int, int, int, int, int], limits: ImageLimits, walked: _PngChunks
) -> tuple[int, int] | None:
    """The size of an 8-bit RGB PNG that Pillow would open as it is and leave upright, read without Pillow: its
    header is the first chunk, only the chunks of `_PLAIN_PNG_CHUNKS`, each of the length Pillow reads, come before its
    pixels, no metadata chunk comes anywhere, every chunk checks out (`walked`, `_png_chunks`), and its size is within
    the limits. None for any other image: `decode_image` then opens it with Pillow, which judges it as before."""
    if not walked.whole or walked.before[:1] != ((b"IHDR", 13),) or walked.after & _PNG_METADATA_CHUNKS:
        return None
    if any(_PLAIN_PNG_CHUNKS.get(kind) != length for kind, length in walked.before[1:]):
        return None
    width, height, depth, colour, _compression, filtering = header
    pixels = width * height
    if (depth, colour, filtering) != (8, 2, 0) or not 0 < pixels <= limits.max_pixels:
        return None
    if Image.MAX_IMAGE_PIXELS is not None and pixels > Image.MAX_IMAGE_PIXELS:
        return None
    return width, height


@dataclass(frozen=True)
class _PngChunks:
    """A PNG's chunks as `_png_chunks` walked them (`whole` False: the walk found the PNG broken)."""

    before: tuple[tuple[bytes, int], ...] = ()
    after: frozenset[bytes] = frozenset()
    whole: bool = True


def _walked(data: bytes) -> _PngChunks:
    try:
        return _png_chunks(data)
    except ImageCorrupt:
        return _PngChunks(whole=False)


def _png_chunks(data: bytes) -> _PngChunks:
    """The type and length of each chunk before a PNG's first image data chunk, and the types of those between it and
    IEND, once the length and CRC of every chunk up to IEND is checked (what Pillow's `verify` checks, without
    copying); `ImageCorrupt` otherwise."""
    view = memoryview(data)
    position = len(_PNG_SIGNATURE)
    before: list[tuple[bytes, int]] = []
    after: set[bytes] | None = None
    while True:
        if position + 8 > len(data):
            raise ImageCorrupt("the PNG image is truncated or damaged: it ends before its IEND chunk")
        length, kind = _CHUNK_HEADER.unpack_from(data, position)
        if not _CHUNK_TYPE.fullmatch(kind):
            raise ImageCorrupt(f"the PNG image is truncated or damaged: a broken chunk {kind!r} at byte {position}")
        if kind == b"IEND":
            if after is None:
                raise ImageCorrupt("the PNG image is truncated or damaged: it has no image data (IDAT) chunk")
            return _PngChunks(tuple(before), frozenset(after))
        end = position + 8 + length
        if end + 4 > len(data):
            raise ImageCorrupt(
                f"the PNG image is truncated or damaged: its {kind.decode()} chunk at byte {position} runs past the end"
            )
        if zlib.crc32(view[position + 4 : end]) != int.from_bytes(view[end : end + 4], "big"):
            raise ImageCorrupt(
                f"the PNG image is truncated or damaged: a bad checksum in its {kind.decode()} chunk at byte {position}"
            )
        if after is not None:
            after.add(kind)
        elif kind == b"IDAT":
            after = set()
        else:
            before.append((kind, length))
        position = end + 4


def _png_upright(image: Image.Image, chunks_after_pixels: frozenset[bytes]) -> bool:
    """Whether Pillow finds no EXIF orientation in the PNG, judged without decoding it: from the metadata before
    its pixels, when none follows them (Pillow's PNG `getexif` would decode the pixels to read what follows)."""
    if chunks_after_pixels & _PNG_METADATA_CHUNKS:
        return False
    try:
        return bool(Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1) == 1)
    except (OSError, SyntaxError, ValueError, EOFError):
        return False  # decoded at once, which says what is wrong


def _decode_pixels(data: bytes, limits: ImageLimits, size: tuple[int, int]) -> Image.Image:
    """The pixels of an image `decode_image` validated but left undecoded."""
    pixels = _to_rgb(_load(_open(data, limits)))
    if pixels.size != size:
        raise ImageCorrupt(f"the image decodes to {pixels.width}x{pixels.height}, not the declared {size[0]}x{size[1]}")
    return pixels


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
