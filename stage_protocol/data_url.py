"""Images sent inline: `data:image/...;base64,...` URLs (RFC 2397) and their base64. Pure.

`decode_data_url` is `base64_payload` (the URL's head read: its scheme, media type and `;base64` are
case-insensitive) then `decode_base64`: standard or URL-safe base64, whitespace allowed, padding optional; what
would decode past the byte limit is refused before it is decoded. Plain padded standard base64 (what clients send)
decodes in one pass (pybase64, SIMD), without copying the text; anything else is first made so.

The errors, which each caller maps into its own (the orchestrator's request errors, the vision server's statuses)::

    DataUrlError
    ├── NotDataUrl        not a data: URL: `scheme` is its scheme in lower case ("" when it has none; "data" when
    │                     its head cannot be read)
    ├── DataUrlInvalid    a data: URL, but not of a base64-encoded image (the message says which)
    ├── Base64TooLarge    the base64 decodes to more than the limit
    └── Base64Invalid     the text is not base64 (the message is the standard library's)
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re

import pybase64

_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*):")
_DATA_URL = re.compile(
    r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.IGNORECASE
)
"""A `data:` URL's head; its scheme, media type and `base64` are case-insensitive (RFC 2397, RFC 3986)."""


class DataUrlError(ValueError):
    """Root of what reading an inline image can fail with (module docstring)."""


class NotDataUrl(DataUrlError):
    def __init__(self, scheme: str) -> None:
        super().__init__(f"not a data: URL (scheme {scheme or '(none)'!r})")
        self.scheme = scheme


class DataUrlInvalid(DataUrlError):
    pass


class Base64TooLarge(DataUrlError):
    pass


class Base64Invalid(DataUrlError):
    pass


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a `data:image/...;base64,...` URL, at most about `max_bytes` (`decode_base64`)."""
    return decode_base64(base64_payload(url), max_bytes)


def base64_payload(url: str) -> str:
    """The base64 text of a `data:image/...;base64,...` URL, after its head."""
    scheme = _scheme(url)
    match = _DATA_URL.match(url)
    if scheme != "data" or match is None:
        raise NotDataUrl(scheme)
    media_type = (match.group("type") or "").lower()
    if not media_type.startswith("image/"):
        raise DataUrlInvalid(f"the data: URL's media type is {media_type or '(none)'!r}; it must be image/*")
    if match.group("b64") is None:
        raise DataUrlInvalid("the data: URL must be base64-encoded (…;base64,…)")
    return url[match.end() :]


def _scheme(url: str) -> str:
    """The URL's scheme in lower case; empty when it has none."""
    match = _SCHEME.match(url)
    return match.group("scheme").lower() if match else ""


def decode_base64(text: str, max_bytes: int) -> bytes:
    """Decode standard or URL-safe base64, whitespace allowed, padding optional; refuse what would decode to more
    than `max_bytes` (give or take the 3 bytes of the last group) before decoding it."""
    if _decoded_size(text) <= max_bytes + 3:  # the fast path: already plain padded standard base64
        with contextlib.suppress(binascii.Error, ValueError):
            return pybase64.b64decode(text, validate=True)
    compact = "".join(text.split())
    if _decoded_size(compact) > max_bytes + 3:
        raise Base64TooLarge(f"the base64 decodes to more than {max_bytes} bytes")
    compact = compact.replace("-", "+").replace("_", "/")
    compact += "=" * (-len(compact) % 4)
    with contextlib.suppress(binascii.Error, ValueError):
        return pybase64.b64decode(compact, validate=True)
    try:  # the standard library's errors say what is wrong more precisely
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Base64Invalid(str(exc)) from None


def _decoded_size(text: str) -> int:
    """At most how many bytes `text` decodes to, as base64 without whitespace."""
    return len(text) * 3 // 4
