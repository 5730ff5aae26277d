"""The cheap intake path: base64 through pybase64, JSON through orjson (falling back to `json.loads` wherever the two
differ), small uploads decoded on the event loop (the PNG checks are `test_png_intake.py`'s)."""

from __future__ import annotations

import asyncio
import base64
import codecs
import json
import math
from types import SimpleNamespace
from typing import cast

import pytest

from orchestrator.analysis.types import Routed
from orchestrator.api import intake
from orchestrator.api.deps import Services
from orchestrator.api.inputs import _json_object, decode_base64
from orchestrator.errors import InvalidBase64, InvalidJson, ValidationFailed
from orchestrator.settings import LimitSettings
from tests.images import image_bytes, noise_png
from vision_stage.errors import ImageTooLarge
from vision_stage.images import ImageLimits, decode_image
from vision_stage.types import DecodedImage

# --- base64 -----------------------------------------------------------------------------------------------------------

PAYLOAD = bytes(range(256)) * 40 + b"\xfb\xff"  # holds the bytes that encode to + / and - _


def test_plain_base64_decodes_without_the_standard_library(monkeypatch: pytest.MonkeyPatch) -> None:
    text = base64.b64encode(PAYLOAD).decode()

    def refuse(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("the standard library decoded plain base64")

    monkeypatch.setattr("stage_protocol.data_url.base64.b64decode", refuse)
    assert decode_base64(text, 1 << 20) == PAYLOAD


@pytest.mark.parametrize(
    "text",
    [
        base64.urlsafe_b64encode(PAYLOAD).decode(),
        "\n".join(codecs.encode(PAYLOAD, "base64").decode().split("\n")),  # MIME lines of 76 characters
        " " + base64.b64encode(PAYLOAD).decode().replace("A", "A\t", 5) + "\r\n",
        base64.urlsafe_b64encode(PAYLOAD).decode().rstrip("="),
        base64.b64encode(PAYLOAD).decode() + "=",  # excess padding, which the standard library reads
    ],
    ids=["url-safe", "mime-lines", "whitespace", "url-safe-unpadded", "excess-padding"],
)
def test_other_base64_spellings_still_decode(text: str) -> None:
    assert decode_base64(text, 1 << 20) == PAYLOAD


def test_whitespace_does_not_count_against_the_limit() -> None:
    data = bytes(range(60))
    spaced = "\n".join(base64.b64encode(data).decode())  # twice as long as the base64 itself
    assert decode_base64(spaced, 60) == data
    with pytest.raises(ImageTooLarge, match="more than 50 bytes"):
        decode_base64(spaced, 50)


def test_unpadded_short_base64_decodes() -> None:
    assert decode_base64("QUI", 10) == b"AB"
    assert decode_base64("QQ", 10) == b"A"


@pytest.mark.parametrize("text", ["QUJD*", "QU JD!", "Q", "QQ==QQ==x", "QUJDé", "===="])
def test_invalid_base64_is_invalid_base64(text: str) -> None:
    with pytest.raises(InvalidBase64, match="not valid base64"):
        decode_base64(text, 1 << 20)


def test_oversize_base64_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("decoded an oversize image")

    monkeypatch.setattr("stage_protocol.data_url.pybase64.b64decode", refuse)
    with pytest.raises(ImageTooLarge, match="more than 100 bytes"):
        decode_base64("A" * 200, 100)


# --- JSON -------------------------------------------------------------------------------------------------------------


def test_json_is_parsed_by_orjson(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> object:
        raise AssertionError("json.loads parsed a body orjson reads")

    monkeypatch.setattr("orchestrator.api.inputs.json.loads", refuse)
    body = {"question": "Wh\u00e4t?", "n": 2**64 - 1, "m": -(2**63), "x": 1.5, "l": [None, True, {"k": "v"}]}
    assert _json_object(json.dumps(body).encode()) == body


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"question": "What?",', "not valid JSON"),
        (b'{"question": "\xff\xfe"}', "not valid JSON"),
        (b"", "not valid JSON"),
        (b'{"a": 1} x', "not valid JSON"),
        (b'{"question": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nests deeper than this service reads"),
        (b'{"question": ' + b"[" * 2000 + b"]" * 2000 + b"}", "nests deeper than this service reads"),
    ],
    ids=["truncated", "not-utf8", "empty", "trailing", "very-deep", "past-orjson-depth"],
)
def test_invalid_json_is_invalid_json(body: bytes, message: str) -> None:
    with pytest.raises(InvalidJson, match=message):
        _json_object(body)


@pytest.mark.parametrize("body", [b"[1, 2]", b'"hello"', b"null", b"3"])
def test_json_that_is_not_an_object_fails_validation(body: bytes) -> None:
    with pytest.raises(ValidationFailed, match="must be an object"):
        _json_object(body)


def test_what_json_loads_reads_and_orjson_refuses_or_rounds_is_read_as_json_loads_reads_it() -> None:
    assert _json_object(b'{"q": "\\ud800What"}') == {"q": "\ud800What"}  # lone surrogate: checked_text names it
    nan = _json_object(b'{"t": NaN, "u": -Infinity}')
    assert math.isnan(cast(float, nan["t"]))
    assert nan["u"] == -math.inf
    huge = _json_object(b'{"n": 18446744073709551616, "m": [-9223372036854775809]}')
    assert huge == {"n": 2**64, "m": [-(2**63) - 1]}
    assert isinstance(huge["n"], int)
    assert _json_object(b'{"f": 1e19}') == {"f": 1e19}
    assert _json_object('{"q": "\u00e4"}'.encode("utf-16")) == {"q": "\u00e4"}
    assert _json_object(b'\xef\xbb\xbf{"q": 1}') == {"q": 1}


# --- where the decoding runs ------------------------------------------------------------------------------------------


def services(pipeline: object = None) -> Services:
    return cast(Services, SimpleNamespace(settings=SimpleNamespace(limits=LimitSettings()), pipeline=pipeline))


def test_only_small_uploads_of_few_pixels_decode_on_the_event_loop() -> None:
    assert intake.decodes_inline(image_bytes("JPEG", size=(200, 200)))
    assert intake.decodes_inline(b"not an image")  # refused at once wherever it runs
    tiny_but_huge = image_bytes("PNG", size=(3000, 3000), mode="1", color=1)
    assert len(tiny_but_huge) < 64 * 1024
    assert not intake.decodes_inline(tiny_but_huge)
    large = noise_png(size=(200, 200))
    assert len(large) > 64 * 1024
    assert not intake.decodes_inline(large)


async def test_decode_hops_to_a_thread_only_for_large_uploads(monkeypatch: pytest.MonkeyPatch) -> None:
    hops = []
    real = asyncio.to_thread

    async def to_thread(func: object, /, *args: object) -> object:
        hops.append(func)
        return await real(func, *args)  # type: ignore[arg-type]

    monkeypatch.setattr("orchestrator.api.intake.asyncio.to_thread", to_thread)
    small = await intake.decode(services(), image_bytes("PNG", size=(40, 30)))
    assert (small.width, hops) == (40, [])
    large = await intake.decode(services(), noise_png(size=(200, 200)))
    assert (large.width, large.pixels_decoded, hops) == (200, False, [decode_image])


@pytest.mark.parametrize(
    ("mode", "response_format", "order"),
    [
        ("auto", "text", ["route", "decode", "routed"]),  # the router's work overlaps the decoding
        ("vision", "text", ["route", "routed", "decode"]),  # the client chose: routed first, no task
        ("reasoning", "text", ["route", "routed", "decode"]),
        ("auto", "json", ["route", "routed", "decode"]),
    ],
)
async def test_routing_starts_before_an_inline_decoding_unless_the_route_is_chosen(
    mode: str, response_format: str, order: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    events = []
    routed = cast(Routed, object())

    class Pipeline:
        async def route(self, question: str, mode: object, response_format: object) -> Routed:
            events.append("route")
            await asyncio.sleep(0.01)
            events.append("routed")
            return routed

    def decoding(data: bytes, limits: ImageLimits) -> DecodedImage:
        events.append("decode")
        return decode_image(data, limits)

    monkeypatch.setattr(intake, "decode_image", decoding)
    image, result = await intake.decode_and_route(
        services(Pipeline()),
        image_bytes("PNG", size=(40, 30)),
        "What?",
        mode,  # type: ignore[arg-type]
        response_format,  # type: ignore[arg-type]
    )
    assert (image.width, result) == (40, routed)
    assert events == order
