"""Reading requests: an analyze request, JSON or multipart, into image bytes and validated options; a JSON body into a
validated model (the chat completions request); images from base64, `data:` URLs and http(s) URLs.

An http(s) URL is fetched by the app's `orchestrator.security.fetch.ImageFetcher` (`image_fetcher`: none when
`fetch.enabled` is off, and then the URL is refused with `image_url_not_supported`).

Every way a request can be malformed ends here as an `orchestrator.errors.RequestInvalid` subclass.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from orchestrator.api.schemas import AnalyzeJsonRequest
from orchestrator.errors import (
    ImageMissing,
    ImageUrlNotSupported,
    InvalidBase64,
    InvalidDataUrl,
    InvalidJson,
    InvalidMultipart,
    UnsupportedMediaType,
    ValidationFailed,
)
from orchestrator.security.fetch import ImageFetcher
from stage_protocol import data_url
from vision_stage.errors import ImageTooLarge

_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*):")
_FORM_FIELDS = frozenset({"image", "question", "mode", "profile", "response_format", "stream", "session_id"})
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class AnalyzeInputs:
    image: bytes | None
    """None when the request names a session instead (`options.session_id`)."""
    options: AnalyzeJsonRequest
    """The validated options; its image fields are cleared once `image` holds the bytes."""
    image_url: str | None = None
    """The http(s) URL `image` was fetched from (where its redirects led), for a vision backend that passes URLs
    through (`vision.pass_image_urls`); None for uploads, base64 and `data:` URLs."""


@dataclass(frozen=True)
class ImageInput:
    data: bytes
    url: str | None = None
    """As `AnalyzeInputs.image_url`."""


async def read_analyze_request(request: Request, max_image_bytes: int) -> AnalyzeInputs:
    content_type = _content_type(request)
    if content_type == "application/json":
        return await _from_json(request, max_image_bytes)
    if content_type == "multipart/form-data":
        return await _from_form(request, max_image_bytes)
    raise UnsupportedMediaType(
        f"unsupported content type {content_type or '(none)'!r}: send multipart/form-data or application/json"
    )


async def read_json_request(request: Request, model: type[M]) -> M:
    """A JSON body validated as `model`."""
    content_type = _content_type(request)
    if content_type != "application/json":
        raise UnsupportedMediaType(f"unsupported content type {content_type or '(none)'!r}: send application/json")
    return validated(model, _json_object(await request.body()))


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _json_object(body: bytes) -> dict[str, object]:
    """The body parsed as JSON, as `json.loads` reads it: orjson parses it (the fast path); a body orjson refuses
    (NaN, a lone surrogate escape, UTF-16, a byte order mark, nesting past its depth of 1024, invalid JSON) or
    reads differently (an integer past 64 bits, which it turns into a float) is read again by `json.loads`, whose
    answer or error stands."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = _json_loads(body)
    else:
        if _has_huge_number(data):
            data = _json_loads(body)
    if not isinstance(data, dict):
        raise ValidationFailed("the JSON body must be an object")
    return data


def _json_loads(body: bytes) -> object:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidJson(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidJson("the body is not valid JSON: it nests deeper than this service reads") from None


_HUGE = float(2**63)
"""orjson reads an integer outside [-2**63, 2**64) as a float, of at least this magnitude."""


def _has_huge_number(data: object) -> bool:
    """Whether `data` (as orjson parsed it) holds a float of a magnitude that may be an integer orjson rounded."""
    pending = [data]
    while pending:
        value = pending.pop()
        if isinstance(value, float):
            if abs(value) >= _HUGE:
                return True
        elif isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return False


async def read_image_url(request: Request, url: str, max_image_bytes: int) -> ImageInput:
    """The image at `url`: a `data:` URL decoded, an http(s) URL fetched by the app's fetcher."""
    scheme = _scheme(url)
    if scheme not in ("http", "https"):
        return ImageInput(decode_data_url(url, max_image_bytes))
    fetcher = image_fetcher(request)
    if fetcher is None:
        raise ImageUrlNotSupported("fetching http(s) image URLs is turned off here; send a data: URL or the bytes")
    fetched = await fetcher.fetch(url)
    return ImageInput(fetched.data, fetched.url)


def image_fetcher(request: Request) -> ImageFetcher | None:
    """The app's image fetcher (`app.state.image_fetcher`, set while it runs with `fetch.enabled`), or None."""
    fetcher = getattr(request.app.state, "image_fetcher", None)
    return fetcher if isinstance(fetcher, ImageFetcher) else None


async def _from_json(request: Request, max_image_bytes: int) -> AnalyzeInputs:
    options = validated(AnalyzeJsonRequest, _json_object(await request.body()))
    given = [name for name in ("image_base64", "image_url", "session_id") if getattr(options, name) is not None]
    if len(given) != 1:
        raise ImageMissing("give exactly one of `image_base64`, `image_url` and `session_id`")
    if options.session_id is not None:
        return AnalyzeInputs(None, options)
    if options.image_base64 is not None:
        image = ImageInput(decode_base64(options.image_base64, max_image_bytes))
    else:
        image = await read_image_url(request, options.image_url or "", max_image_bytes)
    cleared = options.model_copy(update={"image_base64": None, "image_url": None})
    return AnalyzeInputs(image.data, cleared, image.url)


async def read_form(request: Request, *, max_fields: int) -> FormData:
    """The multipart form of `request` (one file part at most). A body cut before its closing boundary, or one
    the parser refuses, is `InvalidMultipart` (the parser itself would quietly drop an unfinished part)."""
    _, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if boundary and b"--" + boundary + b"--" not in await request.body():
        raise InvalidMultipart("the multipart body ends before its closing boundary: was the upload cut short?")
    try:
        return await request.form(max_files=1, max_fields=max_fields)
    except (HTTPException, MultiPartException) as exc:
        detail = exc.detail if isinstance(exc, HTTPException) else exc.message
        raise InvalidMultipart(f"the multipart body could not be read: {detail}") from None


async def _from_form(request: Request, max_image_bytes: int) -> AnalyzeInputs:
    form = await read_form(request, max_fields=len(_FORM_FIELDS))
    try:
        unknown = sorted(set(form.keys()) - _FORM_FIELDS)
        if unknown:
            raise ValidationFailed(f"unknown form fields: {', '.join(unknown)}; accepted: {sorted(_FORM_FIELDS)}")
        upload = form.get("image")
        if isinstance(upload, UploadFile) == ("session_id" in form):
            raise ImageMissing("the form needs exactly one of an `image` file part and a `session_id` field")
        image = await upload.read(max_image_bytes + 1) if isinstance(upload, UploadFile) else None
        options = validated(AnalyzeJsonRequest, {key: value for key, value in form.items() if key != "image"})
    finally:
        await form.close()
    return AnalyzeInputs(image, options)


def validated(model: type[M], data: dict[str, object]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValidationFailed(validation_problems(exc.errors())) from None


def validation_problems(errors: Sequence[Mapping[str, Any]]) -> str:
    """Pydantic's errors as one line: `field.path: message; …`."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in errors)


def decode_base64(text: str, max_image_bytes: int) -> bytes:
    """Decode standard or URL-safe base64, whitespace allowed; refuse what would decode past the byte limit
    (`stage_protocol.data_url.decode_base64`)."""
    try:
        return data_url.decode_base64(text, max_image_bytes)
    except data_url.Base64TooLarge:
        message = f"the base64 image decodes to more than {max_image_bytes} bytes; that is the limit"
        raise ImageTooLarge(message) from None
    except data_url.Base64Invalid as exc:
        raise InvalidBase64(f"the image is not valid base64: {exc}") from None


def decode_data_url(url: str, max_image_bytes: int) -> bytes:
    """The bytes of a `data:image/...;base64,...` URL (`stage_protocol.data_url`). Any other scheme is refused
    (`image_url_not_supported`): http(s) URLs are fetched by `read_image_url`, not here."""
    try:
        payload = data_url.base64_payload(url)
    except data_url.NotDataUrl as exc:
        if exc.scheme in ("http", "https"):
            message = "http(s) image URLs are not fetched here; send a data: URL or the bytes"
            raise ImageUrlNotSupported(message) from None
        if exc.scheme not in ("", "data"):
            message = f"the {exc.scheme}: scheme is not fetched; send an http(s) URL or a data: URL"
            raise ImageUrlNotSupported(message) from None
        message = "`image_url` must be a data: URL such as data:image/png;base64,... or an http(s) URL"
        raise InvalidDataUrl(message) from None
    except data_url.DataUrlInvalid as exc:
        raise InvalidDataUrl(str(exc)) from None
    return decode_base64(payload, max_image_bytes)


def _scheme(url: str) -> str:
    """The URL's scheme in lower case; empty when it has none."""
    match = _SCHEME.match(url)
    return match.group("scheme").lower() if match else ""
