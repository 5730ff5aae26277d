"""A corpus of malformed and hostile inputs against every endpoint that reads an image (`/v1/analyze`,
`/v1/chat/completions`, `/infer`, `/caption`): each gets a 4xx with the right error `type`, never a 5xx; the odd
but valid images (16-bit, CMYK, many frames, polyglots that are images) are answered.

Files travel the way each endpoint takes them (a multipart part, or a `data:` URL in JSON); bodies, multipart
oddities and headers are sent as they are.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from orchestrator.api.app import create_app
from orchestrator.settings import RateLimitSettings, Settings
from orchestrator.wiring import Backends
from tests.fakes import FakeReasoning, FakeVision
from tests.images import image_bytes, png_bytes

pytestmark = pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")  # Pillow, reading the garbage TIFF

PNG = png_bytes()
QUESTION = "What is the total?"
ENDPOINTS = ("/v1/analyze", "/v1/chat/completions", "/infer", "/caption")


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    backends = Backends(FakeVision(), FakeReasoning())
    unlimited = RateLimitSettings(requests_per_s=1e6, burst=10**6, max_concurrent=1000)
    with TestClient(create_app(Settings(rate_limit=unlimited), backends), raise_server_exceptions=False) as c:
        yield c


# --- files ----------------------------------------------------------------------------------------------------------


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


def send_file(client: TestClient, endpoint: str, data: bytes) -> Any:
    """`data` as the endpoint takes an image."""
    if endpoint == "/v1/analyze":
        return client.post(endpoint, files={"image": ("x.png", data, "image/png")}, data={"question": QUESTION})
    if endpoint == "/caption":
        return client.post(endpoint, files={"file": ("x.png", data, "image/png")})
    if endpoint == "/infer":
        return client.post(endpoint, json={"image_url": data_url(data), "prompt": QUESTION})
    return client.post(endpoint, json=chat_body(data_url(data)))


def assert_answered(response: Any, status: int, type_: str | None) -> None:
    assert response.status_code < 500, response.text
    assert response.status_code == status, response.text
    if type_ is None:
        return
    error = response.json()["error"]
    assert (error["type"], error["request_id"]) == (type_, response.headers["x-request-id"])
    assert error["message"]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("case", FILES, ids=[case.name for case in FILES])
def test_hostile_files(client: TestClient, case: FileCase, endpoint: str) -> None:
    assert_answered(send_file(client, endpoint, case.data()), case.status, case.type)


# --- JSON bodies ----------------------------------------------------------------------------------------------------

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


@pytest.mark.parametrize("case", BODIES, ids=[f"{case.endpoint}:{case.name}" for case in BODIES])
def test_hostile_json_bodies(client: TestClient, case: BodyCase) -> None:
    response = client.post(case.endpoint, content=case.body, headers=case.headers)
    assert_answered(response, case.status, case.type)


@pytest.mark.parametrize("endpoint", JSON_ENDPOINTS)
def test_deeply_nested_json_is_invalid_json(client: TestClient, endpoint: str) -> None:
    body = f'{{"question": {DEEP_NESTING}}}'.encode()
    response = client.post(endpoint, content=body, headers={"content-type": "application/json"})
    assert_answered(response, 400, "invalid_json")


def test_a_body_over_the_request_limit_is_refused(client: TestClient) -> None:
    body = b'{"question": "' + b"x" * (31 * 1024 * 1024) + b'"}'
    for endpoint in JSON_ENDPOINTS:
        response = client.post(endpoint, content=body, headers={"content-type": "application/json"})
        assert_answered(response, 413, "request_too_large")


# --- multipart oddities ---------------------------------------------------------------------------------------------

MULTIPART_ENDPOINTS = ("/v1/analyze", "/caption")
FILE_FIELD = {"/v1/analyze": "image", "/caption": "file"}


def form_fields(endpoint: str) -> dict[str, str]:
    return {"question": QUESTION} if endpoint == "/v1/analyze" else {}


@dataclass(frozen=True)
class Multipart:
    name: str
    build: Callable[[str], dict[str, Any]]
    """The endpoint → the keyword arguments of `client.post`."""
    status: int
    type: str | None


def _raw_multipart(body: bytes, content_type: str = "multipart/form-data; boundary=b0undary") -> dict[str, Any]:
    return {"content": body, "headers": {"content-type": content_type}}


def _part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--b0undary\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"


MULTIPARTS = (
    Multipart("no-boundary", lambda e: _raw_multipart(b"--x\r\n", "multipart/form-data"), 400, "invalid_multipart"),
    Multipart("wrong-boundary", lambda e: _raw_multipart(b"--other\r\ngarbage"), 400, "invalid_multipart"),
    Multipart(
        "no-closing-boundary",  # an upload cut short: said so, not taken for a form without its file
        lambda e: _raw_multipart(_part(FILE_FIELD[e], PNG, "x.png")[:-30]),
        400,
        "invalid_multipart",
    ),
    Multipart(
        "cut-after-a-whole-part",
        lambda e: _raw_multipart(_part(FILE_FIELD[e], PNG, "x.png") + _part("question", b"What?")[:12]),
        400,
        "invalid_multipart",
    ),
    Multipart("empty-form", lambda e: _raw_multipart(b"--b0undary--\r\n"), 400, "image_missing"),
    Multipart(
        "file-as-text-field",
        lambda e: {"files": {FILE_FIELD[e]: (None, "not a file")}, "data": form_fields(e)},
        400,
        "image_missing",
    ),
    Multipart(
        "two-files",
        lambda e: {"files": [(FILE_FIELD[e], ("a.png", PNG)), (FILE_FIELD[e], ("b.png", PNG))], "data": form_fields(e)},
        400,
        "invalid_multipart",
    ),
    Multipart(
        "too-many-fields",
        lambda e: {
            "files": {FILE_FIELD[e]: ("x.png", PNG)},
            "data": {**form_fields(e), **{f"f{i}": "x" for i in range(20)}},
        },
        400,
        "invalid_multipart",
    ),
    Multipart(
        "unknown-field",
        lambda e: {"files": {FILE_FIELD[e]: ("x.png", PNG)}, "data": {**form_fields(e), "admin": "1"}},
        422,
        "validation_error",
    ),
    Multipart(
        "file-under-another-name",
        lambda e: {"files": {"upload": ("x.png", PNG)}, "data": form_fields(e)},
        422,
        "validation_error",
    ),
    Multipart(
        "hostile-filename",
        lambda e: {"files": {FILE_FIELD[e]: ('../../etc/passwd"\r\nX-Evil: 1', PNG)}, "data": form_fields(e)},
        200,
        None,
    ),
    Multipart(
        "mislabelled-part",
        lambda e: {"files": {FILE_FIELD[e]: ("x.gif", PNG, "application/x-msdownload")}, "data": form_fields(e)},
        200,
        None,
    ),
)


@pytest.mark.parametrize("endpoint", MULTIPART_ENDPOINTS)
@pytest.mark.parametrize("case", MULTIPARTS, ids=[case.name for case in MULTIPARTS])
def test_multipart_oddities(client: TestClient, case: Multipart, endpoint: str) -> None:
    assert_answered(client.post(endpoint, **case.build(endpoint)), case.status, case.type)


def test_analyze_form_field_oddities(client: TestClient) -> None:
    image = {"image": ("x.png", PNG, "image/png")}
    assert_answered(client.post("/v1/analyze", files=image), 422, "validation_error")  # no question
    assert_answered(
        client.post("/v1/analyze", files=image, data={"question": QUESTION, "stream": "maybe"}), 422, "validation_error"
    )
    assert_answered(client.post("/v1/analyze", files=image, data={"question": "x" * 5000}), 422, "validation_error")
    latin1 = _part("question", "Qu’est-ce que c’est ?".encode("cp1252")) + _part("image", PNG, "x.png")
    response = client.post("/v1/analyze", **_raw_multipart(latin1 + b"--b0undary--\r\n"))
    assert response.status_code == 200, response.text  # not UTF-8: read leniently, not refused


def test_the_corpus_is_large() -> None:
    distinct = len(FILES) + len({case.name for case in BODIES}) + len(MULTIPARTS)
    assert distinct >= 40
