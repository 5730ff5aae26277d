"""Small images made in memory for tests."""

from __future__ import annotations

import io
import random
import struct
import zlib

from PIL import Image, ImageDraw, ImageFont

from vision_stage.images import ImageLimits, decode_image
from vision_stage.types import DecodedImage


def png_bytes(size: tuple[int, int] = (64, 48), color: str = "white", mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def text_png(lines: tuple[str, ...], *, width: int, row: int, left: int, bottom: int) -> bytes:
    """A white PNG `width` wide with `lines` in black, one per `row` pixels from 40 down and `left` in, in Pillow's
    default font at 36 px (readable by the embedded OCR), and `bottom` pixels below the last row."""
    image = Image.new("RGB", (width, 40 + row * len(lines) + bottom), "white")
    draw = ImageDraw.Draw(image)
    for n, text in enumerate(lines):
        draw.text((left, 40 + row * n), text, fill="black", font=ImageFont.load_default(size=36))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_bytes(format: str, size: tuple[int, int] = (64, 48), mode: str = "RGB", color: object = "white") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format=format)  # type: ignore[arg-type]
    return buffer.getvalue()


def decoded(size: tuple[int, int] = (64, 48)) -> DecodedImage:
    return decode_image(png_bytes(size), ImageLimits())


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def noise_png(size: tuple[int, int] = (120, 90), seed: int = 7, **save: object) -> bytes:
    """An RGB PNG of random pixels: its IDAT chunks are as large as the pixels, and every byte of them matters."""
    pixels = random.Random(seed).randbytes(size[0] * size[1] * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", size, pixels).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def png_chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """Each chunk of `png`: its type and its data."""
    found, position = [], len(PNG_SIGNATURE)
    while position < len(png):
        length, kind = struct.unpack_from(">I4s", png, position)
        found.append((kind, png[position + 8 : position + 8 + length]))
        position += 12 + length
    return found


def assemble_png(parts: list[tuple[bytes, bytes]]) -> bytes:
    """A PNG of `parts`, each chunk with a correct CRC."""
    body = b"".join(
        struct.pack(">I4s", len(data), kind) + data + struct.pack(">I", zlib.crc32(kind + data)) for kind, data in parts
    )
    return PNG_SIGNATURE + body
