"""The multipart oddities of the hostile-input corpus (`test_hostile_inputs.py`), each with the status and error
`type` it must get."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.hostile_corpus import PNG, QUESTION

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
