"""RGB PNGs at intake: validated by their structure and decoded on first use; a plain one read without Pillow,
as Pillow reads it."""

from __future__ import annotations

import copy
import dataclasses
import io
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image, ImageOps, PngImagePlugin

from tests.images import assemble_png, image_bytes, noise_png, png_chunks
from vision_stage import images
from vision_stage.errors import ImageCorrupt, ImageTooManyPixels
from vision_stage.images import ImageLimits, decode_image
from vision_stage.types import DecodedImage

LIMITS = ImageLimits()


def eager_pixels(data: bytes) -> bytes:
    return Image.open(io.BytesIO(data)).convert("RGB").tobytes()


# --- lazy pixels ------------------------------------------------------------------------------------------------------


def test_an_rgb_png_is_checked_but_not_decoded_until_its_pixels_are_used() -> None:
    data = noise_png()
    image = decode_image(data, LIMITS)
    assert not image.pixels_decoded
    assert (image.format, image.width, image.height, image.byte_size) == ("PNG", 120, 90, len(data))
    assert image.source is data
    assert "pixels_decoded=False" in repr(image)
    assert len(repr(image)) < 300  # never the bytes
    assert not image.pixels_decoded  # repr decoded nothing
    pixels = image.pixels
    assert image.pixels_decoded
    assert (pixels.mode, pixels.size) == ("RGB", (120, 90))
    assert pixels.tobytes() == eager_pixels(data)
    assert image.pixels is pixels  # decoded once, kept


@pytest.mark.parametrize(
    ("format", "mode"), [("JPEG", "RGB"), ("PNG", "RGBA"), ("PNG", "P"), ("PNG", "L"), ("GIF", "P"), ("WEBP", "RGB")]
)
def test_every_other_image_is_decoded_at_once(format: str, mode: str) -> None:
    image = decode_image(image_bytes(format, mode=mode), LIMITS)
    assert image.pixels_decoded
    assert image.pixels.mode == "RGB"


def test_lazily_and_eagerly_decoded_images_are_equal() -> None:
    data = noise_png()
    lazy = decode_image(data, LIMITS)
    eager = DecodedImage(Image.open(io.BytesIO(data)), "PNG", 120, 90, len(data), lazy.sha256, data)
    eager.pixels.load()
    assert lazy == eager
    assert hash(lazy) == hash(eager)


def test_concurrent_first_accesses_decode_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = images._decode_pixels

    def slow_decode(data: bytes, limits: ImageLimits, size: tuple[int, int]) -> Image.Image:
        calls.append(threading.get_ident())
        time.sleep(0.05)  # every thread arrives while the first decodes
        return real(data, limits, size)

    monkeypatch.setattr(images, "_decode_pixels", slow_decode)
    image = decode_image(noise_png(), LIMITS)
    assert calls == []
    barrier = threading.Barrier(8)

    def first_access() -> Image.Image:
        barrier.wait()
        return image.pixels

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: first_access(), range(8)))
    assert len(calls) == 1
    assert all(result is results[0] for result in results)


def test_a_png_whose_compressed_stream_is_broken_behind_valid_checksums_fails_when_its_pixels_are_needed() -> None:
    parts = png_chunks(noise_png())
    kinds = [kind for kind, _ in parts]
    first = kinds.index(b"IDAT")
    parts[first] = (b"IDAT", b"\x00\x00" + parts[first][1][2:])  # no zlib header; the CRC is computed anew
    damaged = assemble_png(parts)
    image = decode_image(damaged, LIMITS)  # every chunk is whole and its CRC right: intake accepts it
    assert (image.width, image.height, image.source) == (120, 90, damaged)
    assert not image.pixels_decoded
    with pytest.raises(ImageCorrupt, match="PNG image is truncated or damaged"):
        _ = image.pixels
    with pytest.raises(ImageCorrupt, match="PNG image is truncated or damaged"):  # again, without decoding again
        _ = image.pixels
    assert not image.pixels_decoded


def test_a_png_whose_structure_does_not_check_out_is_decoded_at_once_and_judged_as_before() -> None:
    data = noise_png()
    whole = decode_image(data, LIMITS)
    with pytest.raises(ImageCorrupt, match="PNG image is truncated or damaged"):
        decode_image(data[:-5000], LIMITS)
    no_iend = decode_image(data[:-12], LIMITS)  # the pixels are whole; IEND is missing: Pillow reads it
    bad_crc = data[:-16] + bytes(byte ^ 0xFF for byte in data[-16:-12]) + data[-12:]  # the last IDAT's checksum
    checksum_off = decode_image(bad_crc, LIMITS)
    for image in (no_iend, checksum_off):
        assert image.pixels_decoded, "decoded at once, not left for later"
        assert image.pixels.tobytes() == whole.pixels.tobytes()
    no_pixels = assemble_png([(kind, chunk) for kind, chunk in png_chunks(data) if kind != b"IDAT"])
    with pytest.raises(ImageCorrupt):
        decode_image(no_pixels, LIMITS)


def test_the_pixel_limit_still_holds_for_a_png_left_undecoded() -> None:
    with pytest.raises(ImageTooManyPixels, match="120x90"):
        decode_image(noise_png(), ImageLimits(max_pixels=10_000))


def exif_oriented(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def xmp_oriented(orientation: int) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    xmp = f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="{orientation}"/></x:xmpmeta>'
    info.add_itxt("XML:com.adobe.xmp", xmp)
    return info


def move_after_pixels(data: bytes, kind: bytes) -> bytes:
    """`data` with its `kind` chunks moved to just before IEND (after the pixels)."""
    parts = png_chunks(data)
    moved = [part for part in parts if part[0] == kind]
    assert moved
    rest = [part for part in parts if part[0] != kind]
    return assemble_png([*rest[:-1], *moved, rest[-1]])


@pytest.mark.parametrize(
    "data",
    [
        noise_png(exif=exif_oriented(6)),
        noise_png(pnginfo=xmp_oriented(6)),
        move_after_pixels(noise_png(exif=exif_oriented(6)), b"eXIf"),
        move_after_pixels(noise_png(pnginfo=xmp_oriented(6)), b"iTXt"),
    ],
    ids=["exif", "xmp", "exif-after-pixels", "xmp-after-pixels"],
)
def test_an_rgb_png_with_an_orientation_is_turned_upright_at_once(data: bytes) -> None:
    image = decode_image(data, LIMITS)
    assert image.pixels_decoded
    assert (image.width, image.height, image.source) == (90, 120, None)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert image.pixels.tobytes() == upright.convert("RGB").tobytes()


def test_metadata_without_an_orientation_keeps_a_png_lazy_unless_it_follows_the_pixels() -> None:
    before = noise_png(pnginfo=xmp_oriented(1), exif=exif_oriented(1))
    image = decode_image(before, LIMITS)
    assert (image.pixels_decoded, image.source) == (False, before)
    after = move_after_pixels(noise_png(pnginfo=xmp_oriented(1)), b"iTXt")  # readable only by decoding: decoded
    image = decode_image(after, LIMITS)
    assert (image.pixels_decoded, image.source, image.width) == (True, after, 120)


def with_chunks(data: bytes, *extra: tuple[bytes, bytes], header: bytes | None = None) -> bytes:
    """`data` with `extra` chunks just after its header (and that header's fields replaced by `header`)."""
    parts = png_chunks(data)
    first = (b"IHDR", header) if header is not None else parts[0]
    return assemble_png([first, *extra, *parts[1:]])


def ihdr(size: tuple[int, int], depth: int = 8, colour: int = 2, filtering: int = 0) -> bytes:
    return struct.pack(">IIBBBBB", *size, depth, colour, 0, filtering, 0)


STANDARD = ((b"sRGB", b"\x00"), (b"gAMA", struct.pack(">I", 45455)), (b"pHYs", bytes(9)), (b"cHRM", bytes(32)))
ICC = zlib.compress(b"not a real profile")


@pytest.mark.parametrize(
    ("data", "without_pillow"),
    [
        (noise_png(), True),
        (with_chunks(noise_png(), *STANDARD), True),
        (with_chunks(noise_png(), (b"gAMA", b"\x00\x01")), False),  # short: Pillow fails on it
        (with_chunks(noise_png(), (b"pHYs", bytes(4))), False),
        (with_chunks(noise_png(), (b"iCCP", b"p\x00\x00" + ICC)), False),
        (with_chunks(noise_png(), (b"iCCP", b"p\x00\x00broken")), False),
        (with_chunks(noise_png(), (b"tIME", bytes(7))), False),
        (with_chunks(noise_png(), (b"tEXt", b"Comment\x00hello")), False),
        (with_chunks(noise_png(), header=ihdr((120, 90), filtering=1)), False),
        (with_chunks(noise_png(), header=ihdr((120, 90), depth=16)), False),
        (with_chunks(noise_png(), header=ihdr((0, 90))), False),
        (with_chunks(noise_png(), header=ihdr((120, 90)) + b"\x00"), False),
        (noise_png(pnginfo=xmp_oriented(1)), False),
        (move_after_pixels(noise_png(pnginfo=xmp_oriented(1)), b"iTXt"), False),
        (image_bytes("PNG", mode="L"), False),
        (image_bytes("PNG", mode="RGBA"), False),
    ],
    ids=[
        "plain", "standard-chunks", "short-gamma", "short-phys", "icc", "broken-icc", "unknown-chunk", "text",
        "filter-method", "16-bit", "empty-size", "long-header", "xmp", "xmp-after-pixels", "grey", "alpha",
    ],
)  # fmt: skip
def test_a_png_read_without_pillow_comes_out_as_pillow_reads_it(
    data: bytes, without_pillow: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    def outcome(limits: ImageLimits) -> object:
        try:
            image = decode_image(data, limits)
        except Exception as exc:
            return type(exc), str(exc)
        fields = (image.format, image.width, image.height, image.byte_size, image.sha256, image.source)
        decoded = image.pixels_decoded
        try:
            return fields, decoded, image.pixels.tobytes()
        except Exception as exc:
            return fields, decoded, type(exc), str(exc)

    small = ImageLimits(max_pixels=5_000)
    ours = outcome(LIMITS), outcome(small)
    with monkeypatch.context() as patched:
        patched.setattr(images, "_plain_png_size", lambda *_: None)
        assert ours == (outcome(LIMITS), outcome(small))  # as Pillow's reading alone had it
    with monkeypatch.context() as patched:
        patched.setattr(images, "_open", lambda *_: pytest.fail("opened with Pillow"))
        if without_pillow:
            image = decode_image(data, LIMITS)
            assert (image.source, image.pixels_decoded) == (data, False)
        else:
            with pytest.raises(pytest.fail.Exception, match="opened with Pillow"):
                decode_image(data, LIMITS)


@pytest.mark.parametrize(
    ("data", "lazy", "walks"),
    [
        (noise_png(), True, 1),
        (with_chunks(noise_png(), (b"iCCP", b"p\x00\x00" + ICC)), True, 1),  # opened with Pillow, still lazy
        (noise_png(exif=exif_oriented(6)), False, 1),
        (image_bytes("PNG", mode="RGBA"), False, 0),  # decoded at once: its chunks are Pillow's to check
    ],
    ids=["plain", "icc", "oriented", "alpha"],
)
def test_every_chunk_of_a_png_is_checked_once_at_most(
    data: bytes, lazy: bool, walks: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    walked = []
    real = images._png_chunks

    def walk(data: bytes) -> images._PngChunks:
        walked.append(len(data))
        return real(data)

    monkeypatch.setattr(images, "_png_chunks", walk)
    image = decode_image(data, LIMITS)
    assert (image.pixels_decoded, len(walked)) == (not lazy, walks)


def test_a_decoded_image_is_immutable_and_copies_as_itself() -> None:
    image = decode_image(noise_png(), LIMITS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        image.width = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        image.pixels = Image.new("RGB", (1, 1))  # type: ignore[misc]
    assert copy.deepcopy(image) is image
    assert not image.pixels_decoded


def test_the_positional_constructor_makes_an_image_of_decoded_pixels() -> None:
    pixels = Image.new("RGB", (4, 3), "white")
    image = DecodedImage(pixels, "PNG", 4, 3, 0, "")
    assert image.pixels_decoded
    assert image.pixels is pixels
    assert image.source is None


def test_a_lazy_image_decodes_through_its_callable_once() -> None:
    pixels = Image.new("RGB", (4, 3))
    calls = []

    def decode() -> Image.Image:
        calls.append(1)
        return pixels

    image = DecodedImage(decode, "PNG", 4, 3, 10, "ab")
    assert (image.pixels_decoded, calls) == (False, [])
    assert image.pixels is pixels
    assert image.pixels is pixels
    assert calls == [1]
