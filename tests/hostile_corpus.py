"""The hostile-input corpus of `test_hostile_inputs.py`: files (images broken, bombed, odd but valid), JSON bodies,
image URLs and multipart oddities, each with the status and error `type` it must get."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from PIL import Image, ImageDraw

from tests.images import image_bytes, png_bytes

PNG = png_bytes()


QUESTION = "What is the total?"


ENDPOINTS = ("/v1/analyze", "/v1/chat/completions", "/infer", "/caption")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose valid header declares `width`×`height`, with almost no pixel data behind it."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _chunk(b"IEND", b"")
    )


def patched(data: bytes, offset: int, values: bytes) -> bytes:
    return data[:offset] + values + data[offset + len(values) :]


def saved(image: Image.Image, format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


@cache
def png_bomb() -> bytes:
    """A real decompression bomb: a few kilobytes of PNG that decode to 49 million pixels (over the 40M limit)."""
    return saved(Image.new("1", (7000, 7000)), "PNG")


@cache
def gif_with_many_frames() -> bytes:
    frames = []
    for index in range(300):
        frame = Image.new("L", (64, 64), 255)
        ImageDraw.Draw(frame).line((0, index % 64, 63, 63 - index % 64), fill=index % 200)
        frames.append(frame)
    return saved(frames[0], "GIF", save_all=True, append_images=frames[1:])


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


@dataclass(frozen=True)
class FileCase:
    name: str
    data: Callable[[], bytes]
    status: int
    type: str | None = None
    """The error's `type`; None for a 200."""


FILES = (
    FileCase("zero-bytes", lambda: b"", 400, "image_empty"),
    FileCase("truncated-png", lambda: truncated(PNG), 400, "image_corrupt"),
    FileCase("truncated-jpeg", lambda: truncated(image_bytes("JPEG", (200, 200), color="red")), 400, "image_corrupt"),
    FileCase("truncated-webp", lambda: truncated(image_bytes("WEBP", (64, 64))), 400, "image_corrupt"),
    FileCase("truncated-gif", lambda: image_bytes("GIF")[:30], 400, "image_corrupt"),
    FileCase("jpeg-magic-only", lambda: b"\xff\xd8\xff", 400, "image_corrupt"),
    FileCase("png-bad-header-crc", lambda: patched(PNG, 29, b"\0\0\0\0"), 400, "image_corrupt"),
    FileCase("png-zero-width", lambda: png_declaring(0, 10), 400, "image_corrupt"),
    FileCase("tiff-garbage-ifd", lambda: b"II*\x00" + b"\x07" * 50, 400, "image_corrupt"),
    FileCase("png-declaring-65535x65535", lambda: png_declaring(65535, 65535), 413, "image_too_many_pixels"),
    FileCase("png-decompression-bomb", png_bomb, 413, "image_too_many_pixels"),
    FileCase(
        "gif-declaring-65535x65535",
        lambda: patched(image_bytes("GIF", (1, 1)), 6, b"\xff" * 4),
        413,
        "image_too_many_pixels",
    ),
    FileCase(
        "bmp-declaring-100000x100000",
        lambda: patched(image_bytes("BMP", (1, 1)), 18, struct.pack("<ii", 100_000, 100_000)),
        413,
        "image_too_many_pixels",
    ),
    FileCase("wrong-magic", lambda: b"\0" + PNG[1:], 415, "image_unsupported"),
    FileCase(
        "svg",
        lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"><script/></svg>',
        415,
        "image_unsupported",
    ),
    FileCase("pdf", lambda: b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n%%EOF", 415, "image_unsupported"),
    FileCase("pdf-png-polyglot", lambda: b"%PDF-1.4\n" + PNG, 415, "image_unsupported"),
    FileCase("html", lambda: b"<!doctype html><img src=x onerror=alert(1)>", 415, "image_unsupported"),
    FileCase("ico", lambda: saved(Image.new("RGB", (16, 16)), "ICO"), 415, "image_unsupported"),
    FileCase("ppm", lambda: saved(Image.new("RGB", (16, 16)), "PPM"), 415, "image_unsupported"),
    FileCase("elf-binary", lambda: b"\x7fELF\x02\x01\x01" + b"\0" * 57, 415, "image_unsupported"),
    FileCase("png-zip-polyglot", lambda: PNG + b"PK\x03\x04" + b"\0" * 26 + b"PK\x05\x06" + b"\0" * 18, 200),
    FileCase("gif-jar-polyglot", lambda: image_bytes("GIF") + b"PK\x03\x04evil.class", 200),
    FileCase("gif-300-frames", gif_with_many_frames, 200),
    FileCase("png-16-bit", lambda: image_bytes("PNG", mode="I;16", color=1000), 200),
    FileCase("jpeg-cmyk", lambda: image_bytes("JPEG", mode="CMYK", color=(0, 50, 100, 0)), 200),
    FileCase("tiff-cmyk", lambda: image_bytes("TIFF", mode="CMYK", color=(0, 50, 100, 0)), 200),
    FileCase("tiff-float", lambda: image_bytes("TIFF", mode="F", color=1.5), 200),
    FileCase("png-grey-alpha", lambda: image_bytes("PNG", mode="LA", color=(10, 100)), 200),
    FileCase("png-1-bit", lambda: image_bytes("PNG", mode="1", color=1), 200),
    FileCase("png-1x1", lambda: png_bytes((1, 1)), 200),
)


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def chat_body(url: str, question: str = QUESTION) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    return {"model": "auto", "messages": [{"role": "user", "content": content}]}


IMAGE = data_url(PNG)


JSON_ENDPOINTS = ("/v1/analyze", "/v1/chat/completions", "/infer")


def valid_body(endpoint: str) -> dict[str, Any]:
    if endpoint == "/v1/analyze":
        return {"question": QUESTION, "image_url": IMAGE}
    if endpoint == "/infer":
        return {"prompt": QUESTION, "image_url": IMAGE}
    return chat_body(IMAGE)


@dataclass(frozen=True)
class BodyCase:
    name: str
    endpoint: str
    body: bytes
    status: int
    type: str
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})


def raw(value: object) -> bytes:
    return json.dumps(value).encode()


def bodies_everywhere() -> list[BodyCase]:
    cases = []
    for endpoint in JSON_ENDPOINTS:
        good = valid_body(endpoint)
        cases += [
            BodyCase("invalid-json", endpoint, b'{"question": "What?",', 400, "invalid_json"),
            BodyCase("not-utf8", endpoint, b'{"question": "\xff\xfe"}', 400, "invalid_json"),
            BodyCase("empty-body", endpoint, b"", 400, "invalid_json"),
            BodyCase("json-array", endpoint, raw([good]), 422, "validation_error"),
            BodyCase("json-string", endpoint, raw("hello"), 422, "validation_error"),
            BodyCase("json-null", endpoint, b"null", 422, "validation_error"),
            BodyCase("unknown-field", endpoint, raw({**good, "admin": True}), 422, "validation_error"),
            BodyCase(
                "nested-garbage", endpoint, raw({**good, "x": {"y": [[[{"z": None}]]] * 50}}), 422, "validation_error"
            ),
            BodyCase(
                "lone-surrogate-text", endpoint, raw(good).replace(b"What", b"\\ud800What"), 422, "validation_error"
            ),
            BodyCase(
                "wrong-content-type", endpoint, raw(good), 415, "unsupported_media_type", {"content-type": "text/plain"}
            ),
            BodyCase("no-content-type", endpoint, raw(good), 415, "unsupported_media_type", {}),
            BodyCase(
                "form-urlencoded",
                endpoint,
                b"question=What",
                415,
                "unsupported_media_type",
                {"content-type": "application/x-www-form-urlencoded"},
            ),
            BodyCase(
                "absurd-content-length",
                endpoint,
                raw(good),
                413,
                "request_too_large",
                {"content-type": "application/json", "content-length": str(10**15)},
            ),
        ]
    return cases


def with_image_url(endpoint: str, url: object) -> dict[str, Any]:
    if endpoint == "/v1/chat/completions":
        return chat_body(url)  # type: ignore[arg-type]
    return {**valid_body(endpoint), "image_url": url}


def image_urls_everywhere() -> list[BodyCase]:
    urls: list[tuple[str, object, int, str]] = [
        ("data-url-bad-base64", "data:image/png;base64,bm90IGJhc2U2NA@@", 400, "invalid_base64"),
        ("data-url-not-image", "data:text/html;base64,PGh0bWw+", 400, "invalid_data_url"),
        ("data-url-not-base64", "data:image/png,rawbytes", 400, "invalid_data_url"),
        ("data-url-no-comma", "data:image/png;base64", 400, "invalid_data_url"),
        ("data-url-empty", "data:", 400, "invalid_data_url"),
        ("data-url-empty-payload", "data:image/png;base64,", 400, "image_empty"),
        ("url-empty", "", 400, "invalid_data_url"),
        ("url-javascript", "javascript:alert(1)", 400, "image_url_not_supported"),
        ("url-file", "file:///etc/passwd", 400, "image_url_not_supported"),
        ("url-loopback", "http://127.0.0.1:9/a.png", 403, "image_url_forbidden"),
        ("url-metadata", "http://169.254.169.254/latest/meta-data/", 403, "image_url_forbidden"),
        ("url-credentials", "https://user:secret@example.com/a.png", 400, "image_url_invalid"),
        ("url-number", 12345, 422, "validation_error"),
        ("url-object", {"url": IMAGE}, 422, "validation_error"),
    ]
    return [
        BodyCase(name, endpoint, raw(with_image_url(endpoint, url)), status, type_)
        for endpoint in JSON_ENDPOINTS
        for name, url, status, type_ in urls
    ]


def endpoint_specific_bodies() -> list[BodyCase]:
    huge_question = "why " * 250_000
    huge_base64 = "A" * (28 * 1024 * 1024)  # decodes to 21 MiB: over the 20 MiB image limit
    chat_text = chat_body(IMAGE)["messages"][0]["content"]
    return [
        BodyCase(
            "huge-question",
            "/v1/analyze",
            raw({"question": huge_question, "image_url": IMAGE}),
            422,
            "validation_error",
        ),
        BodyCase("huge-prompt", "/infer", raw({"prompt": huge_question, "image_url": IMAGE}), 422, "validation_error"),
        BodyCase(
            "huge-chat-text", "/v1/chat/completions", raw(chat_body(IMAGE, huge_question)), 422, "validation_error"
        ),
        BodyCase(
            "huge-base64",
            "/v1/analyze",
            raw({"question": QUESTION, "image_base64": huge_base64}),
            413,
            "image_too_large",
        ),
        BodyCase(
            "bad-base64", "/v1/analyze", raw({"question": QUESTION, "image_base64": "%%%%"}), 400, "invalid_base64"
        ),
        BodyCase(
            "both-images",
            "/v1/analyze",
            raw({"question": QUESTION, "image_base64": "aGk=", "image_url": IMAGE}),
            400,
            "image_missing",
        ),
        BodyCase("question-number", "/v1/analyze", raw({"question": 42, "image_url": IMAGE}), 422, "validation_error"),
        BodyCase(
            "stream-not-bool",
            "/v1/analyze",
            raw({**valid_body("/v1/analyze"), "stream": "maybe"}),
            422,
            "validation_error",
        ),
        BodyCase(
            "mode-list", "/v1/analyze", raw({**valid_body("/v1/analyze"), "mode": ["vision"]}), 422, "validation_error"
        ),
        BodyCase(
            "chat-no-messages", "/v1/chat/completions", raw({"model": "auto", "messages": []}), 422, "validation_error"
        ),
        BodyCase(
            "chat-messages-object",
            "/v1/chat/completions",
            raw({"model": "auto", "messages": {"a": 1}}),
            422,
            "validation_error",
        ),
        BodyCase(
            "chat-part-garbage",
            "/v1/chat/completions",
            raw({"model": "auto", "messages": [{"role": "user", "content": [{"type": "video", "x": 1}]}]}),
            422,
            "validation_error",
        ),
        BodyCase(
            "chat-unknown-model", "/v1/chat/completions", raw({**chat_body(IMAGE), "model": "gpt-9"}), 404, "not_found"
        ),
        BodyCase(
            "chat-no-image",
            "/v1/chat/completions",
            raw({"model": "auto", "messages": [{"role": "user", "content": chat_text[1:]}]}),
            400,
            "image_missing",
        ),
        BodyCase(
            "chat-temperature-nan",
            "/v1/chat/completions",
            raw(chat_body(IMAGE))[:-1] + b', "temperature": NaN}',
            422,
            "validation_error",
        ),
        BodyCase(
            "chat-max-tokens-huge",
            "/v1/chat/completions",
            raw({**chat_body(IMAGE), "max_tokens": 10**12}),
            422,
            "validation_error",
        ),
        BodyCase("chat-n-2", "/v1/chat/completions", raw({**chat_body(IMAGE), "n": 2}), 422, "validation_error"),
        BodyCase(
            "chat-last-not-user",
            "/v1/chat/completions",
            raw({"model": "auto", "messages": [*chat_body(IMAGE)["messages"], {"role": "assistant", "content": "54"}]}),
            422,
            "validation_error",
        ),
        BodyCase("caption-json", "/caption", raw({"file": IMAGE}), 415, "unsupported_media_type"),
    ]


BODIES = (*bodies_everywhere(), *image_urls_everywhere(), *endpoint_specific_bodies())


DEEP_NESTING = "[" * 100_000 + "]" * 100_000
