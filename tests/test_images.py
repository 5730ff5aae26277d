"""Decoding and validating images: every accepted format, normalisation to RGB, and precise rejections."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from tests.images import image_bytes
from vision_stage.errors import ImageCorrupt, ImageEmpty, ImageTooLarge, ImageTooManyPixels, ImageUnsupported
from vision_stage.image_wire import image_data_url
from vision_stage.images import ImageLimits, decode_image, sniff_format

LIMITS = ImageLimits()


@pytest.mark.parametrize("format", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_accepted_formats_decode_to_rgb(format: str) -> None:
    decoded = decode_image(image_bytes(format, size=(40, 30), color="red"), LIMITS)
    assert (decoded.width, decoded.height, decoded.pixels.mode) == (40, 30, "RGB")
    assert decoded.format == format
    assert len(decoded.sha256) == 64
    red, green, blue = decoded.pixels.getpixel((5, 5))  # type: ignore[misc]
    assert (red > 200, green < 60, blue < 60) == (True, True, True)


@pytest.mark.parametrize(
    ("mode", "color"), [("CMYK", (0, 255, 255, 0)), ("P", 1), ("LA", (128, 255)), ("RGBA", (0, 0, 255, 0))]
)
def test_unusual_modes_are_normalised(mode: str, color: object) -> None:
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    decoded = decode_image(image_bytes(fmt, mode=mode, color=color), LIMITS)
    assert decoded.pixels.mode == "RGB"
    if mode == "RGBA":  # fully transparent → composited on white
        assert decoded.pixels.getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    image = Image.new("I;16", (20, 10))
    image.paste(60000, (10, 0, 20, 10))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    pixels = decode_image(buffer.getvalue(), LIMITS).pixels
    assert pixels.getpixel((0, 0)) == (0, 0, 0)
    assert pixels.getpixel((15, 5)) == (255, 255, 255)


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (60, 20), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    decoded = decode_image(buffer.getvalue(), LIMITS)
    assert (decoded.width, decoded.height) == (20, 60)


def test_rejections_name_the_problem() -> None:
    png = image_bytes("PNG")
    with pytest.raises(ImageEmpty):
        decode_image(b"", LIMITS)
    with pytest.raises(ImageTooLarge, match="limit is 10"):
        decode_image(png, ImageLimits(max_bytes=10))
    with pytest.raises(ImageTooManyPixels, match="64x48"):
        decode_image(png, ImageLimits(max_pixels=1000))
    with pytest.raises(ImageUnsupported):
        decode_image(b"<svg xmlns='http://www.w3.org/2000/svg'/>", LIMITS)
    noisy = io.BytesIO()
    Image.effect_noise((200, 200), 80).save(noisy, format="PNG")
    with pytest.raises(ImageCorrupt, match="PNG image is truncated"):
        decode_image(noisy.getvalue()[:-5000], LIMITS)
    with pytest.raises(ImageCorrupt, match="JPEG"):
        decode_image(b"\xff\xd8\xff\xe0" + b"\x00" * 10, LIMITS)


def test_a_decompression_bomb_is_refused_without_decoding() -> None:
    # A 12000 x 12000 PNG compresses to a few hundred kilobytes; it must be refused on its header alone.
    bomb = image_bytes("PNG", size=(12000, 12000), mode="1", color=0)
    assert len(bomb) < 1_000_000
    with pytest.raises(ImageTooManyPixels):
        decode_image(bomb, LIMITS)


def test_sniffing_recognises_signatures() -> None:
    assert sniff_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "WEBP"
    assert sniff_format(b"GIF89a") == "GIF"
    assert sniff_format(b"hello") is None


@pytest.mark.parametrize("format", ["PNG", "JPEG"])
def test_an_upright_rgb_png_or_jpeg_keeps_its_bytes_for_forwarding(format: str) -> None:
    data = image_bytes(format, mode="RGB")
    image = decode_image(data, LIMITS)
    assert image.source == data
    mime = "png" if format == "PNG" else "jpeg"
    assert image_data_url(image) == f"data:image/{mime};base64,{base64.b64encode(data).decode()}"


@pytest.mark.parametrize(
    ("format", "mode"), [("PNG", "RGBA"), ("PNG", "P"), ("PNG", "L"), ("WEBP", "RGB"), ("GIF", "P"), ("BMP", "RGB")]
)
def test_an_image_that_needed_converting_is_encoded_again(format: str, mode: str) -> None:
    image = decode_image(image_bytes(format, mode=mode), LIMITS)
    assert image.source is None
    url = image_data_url(image)
    assert url.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).mode == "RGB"


def test_a_jpeg_turned_upright_by_its_exif_orientation_is_encoded_again() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), "white").save(buffer, format="JPEG", exif=exif)
    upright = decode_image(buffer.getvalue(), LIMITS)
    assert upright.source is None
    assert (upright.width, upright.height) == (20, 40)
