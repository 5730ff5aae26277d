"""What a failed call to a stage server means for the stage, read the way each kind of server means it. Pure.

`classify` turns a `StageHttpError` into a `Failure` of one of these kinds:

- `unavailable`: the server cannot answer now (connection failures, timeouts, 408, 429, 5xx, error events without a
  client-error code); `retryable` says whether asking again may help (not for an exhausted account balance);
- `rejected`: this request will never work (other 4xx, a vendor's safety refusal);
- `image`: the server could not read the image (vLLM's 500 for an image it cannot decode, before it became a 400);
- `invalid`: the answer is unusable (a malformed stream).

Servers differ in how they say it:

- an HTTP status is read as one only in 100–599: the GLM open platform names its errors by business codes
  (`{"error": {"code": "1113", "message": …}}`, codes as strings) that are never statuses; `VENDOR_CODES` says what
  each means (1113, an exhausted balance, comes with a 429 but waiting does not help; 1301 is a safety refusal), and
  OpenAI's `insufficient_quota` is such a 429 too;
- an error event inside a stream carries its status as `code` (vLLM, SGLang), as an integer or a string;
- vLLM answered an image it could not decode with a 500 up to 0.19 (a truncated or damaged file, Pillow's `OSError`;
  a 400 for bytes of no image format since mid-2025, and for both from 0.20, vLLM's PR 38253 of 2026-03):
  `IMAGE_FAILURE` matches what it says, and either status is the request's fault, not an outage: no retry, no
  verdict on the endpoint;
- `finish_failure` reads a stream's `finish_reason`: `stop` and `length` are answers; `content_filter` (OpenAI) and
  `sensitive` (the GLM open platform) are refusals; `abort`, `error` and `network_error` mean the server gave up.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Generic, Literal, TypeVar

from stage_protocol.client.errors import (
    StageErrorEvent,
    StageHttpError,
    StageStatus,
    StageTimedOut,
    StageUnreachable,
    detail,
)

RETRYABLE_STATUSES = frozenset({408, 429})
"""With every 5xx (and 3xx): the statuses that mean "not now" rather than "not this request"."""
Kind = Literal["unavailable", "rejected", "image", "invalid"]
E = TypeVar("E", bound=Exception)


@dataclass(frozen=True)
class VendorCode:
    kind: Kind
    meaning: str
    retryable: bool = True


_ACCOUNT = VendorCode(
    "unavailable", "the account cannot be used (inactive, missing, locked or frozen)", retryable=False
)
_QUOTA = VendorCode("unavailable", "the account's usage limit or plan is used up", retryable=False)
VENDOR_CODES: dict[str, VendorCode] = {
    **dict.fromkeys(("1110", "1111", "1112", "1120", "1121"), _ACCOUNT),
    **dict.fromkeys(("1308", "1309", "1310"), _QUOTA),
    "1113": VendorCode("unavailable", "the account's balance is exhausted", retryable=False),
    "1261": VendorCode("rejected", "the prompt is longer than the model takes"),
    "1301": VendorCode("rejected", "the vendor's safety check refused the content"),
    "1302": VendorCode("unavailable", "rate limit reached"),
    "1303": VendorCode("unavailable", "rate limit reached"),
    "1304": VendorCode("unavailable", "daily call limit reached", retryable=False),
    "1305": VendorCode("unavailable", "the model is overloaded"),
    "insufficient_quota": VendorCode("unavailable", "the account's quota is used up", retryable=False),
}
"""Codes that mean something other than their HTTP status says: the GLM open platform's business codes, and OpenAI's
`insufficient_quota` (a 429 that waiting does not cure)."""
IMAGE_FAILURE = re.compile(
    r"cannot identify image file|image file is truncated|failed to load image|unidentifiedimageerror|"
    r"broken (?:png|data stream)|not a (?:png|jpeg) file|invalid (?:base64|image)|incorrect padding|"
    r"decoder .* not available|truncated (?:file|image)",
    re.IGNORECASE,
)
"""What vLLM (and the Pillow errors it passes on) says of an image it could not decode."""


@dataclass(frozen=True)
class Failure:
    """What a `StageHttpError` means: its `kind`, a message to follow the server's name, how long the server asked
    to wait, whether asking again may help, and for an HTTP error, the `code` of its error object (our own stage
    servers name their errors so) and the server's own words (`detail`)."""

    kind: Kind
    message: str
    retry_after_s: float | None = None
    code: str | None = None
    detail: str = ""
    retryable: bool = True


def classify(exc: StageHttpError, *, stream_codes: bool = True) -> Failure:
    """What `exc` means (module docstring). `stream_codes` False: the server's in-stream error codes say nothing
    (vLLM up to 0.14 labels every in-stream error 400 `BadRequestError`, engine failures included, and checks a
    request before its stream begins), so an error event means the server gave up, unless it names the image."""
    if isinstance(exc, StageStatus):
        return _status_failure(exc)
    if isinstance(exc, StageErrorEvent):
        return _event_failure(exc, stream_codes)
    if isinstance(exc, StageUnreachable | StageTimedOut):
        return Failure("unavailable", str(exc))
    return Failure("invalid", str(exc))


def _event_failure(exc: StageErrorEvent, stream_codes: bool) -> Failure:
    code = _code(exc.body)
    words = detail(exc.body, "no message")
    what = f"an error event (code {code}): {words}"
    vendor = VENDOR_CODES.get(code or "")
    if vendor is not None:
        return _vendor_failure(vendor, code or "", what, words)
    if IMAGE_FAILURE.search(words):
        return Failure("image", f"could not read the image ({what})", detail=words)
    kind, message = _by_status(_status(code) if stream_codes else None, what)
    return Failure(kind, message, detail=words)


def _status_failure(exc: StageStatus) -> Failure:
    code = _code(exc.body)
    words = detail(exc.body, f"status {exc.status}")
    what = f"HTTP {exc.status}: {words}"
    vendor = VENDOR_CODES.get(code or "")
    if vendor is not None:
        failure = _vendor_failure(vendor, code or "", what, words)
    elif (exc.status >= 500 or exc.status == 400) and IMAGE_FAILURE.search(words):
        failure = Failure("image", f"could not read the image ({what})", code=code, detail=words)
    else:
        kind, message = _by_status(exc.status, what)
        failure = Failure(kind, message, code=code, detail=words)
    if failure.kind == "unavailable" and failure.retryable:
        return Failure(failure.kind, failure.message, retry_after_s(exc.headers), failure.code, words)
    return failure


def _vendor_failure(vendor: VendorCode, code: str, what: str, words: str) -> Failure:
    if vendor.kind == "unavailable":
        message = f"answered {what} ({vendor.meaning})"
    else:
        message = f"refused the request with {what} ({vendor.meaning})"
    return Failure(vendor.kind, message, code=code, detail=words, retryable=vendor.retryable)


def _code(body: object) -> str | None:
    """The `code` of an error object as text (servers send integers or strings), None when absent."""
    code = body.get("code") if isinstance(body, dict) else None
    return str(code) if isinstance(code, int | str) and not isinstance(code, bool) else None


def _status(code: str | None) -> int | None:
    """`code` as an HTTP status, when it is one (100–599): never a vendor's business code."""
    return int(code) if code is not None and code.isdigit() and 100 <= int(code) <= 599 else None


def finish_failure(reason: str) -> Failure | None:
    """What a stream's `finish_reason` means (module docstring): None for an answer, whole or cut at the limit."""
    if reason in ("stop", "length"):
        return None
    if reason in ("content_filter", "sensitive"):
        return Failure("rejected", f"refused to answer (finish_reason {reason})")
    if reason in ("abort", "error", "network_error"):
        return Failure("unavailable", f"gave up on the request (finish_reason {reason})")
    return Failure("invalid", f"stopped for an unexpected reason: finish_reason {reason!r}")


@dataclass(frozen=True)
class ErrorTree(Generic[E]):
    """A stage's error class for each kind of failure (`unavailable` takes `retry_after_s` and `retryable`; `image`
    defaults to `rejected`), and the classes that our own stage servers name by the `code` of an HTTP error, which
    keep their class across the hop."""

    unavailable: Callable[..., E]
    rejected: Callable[[str], E]
    invalid: Callable[[str], E]
    by_code: Mapping[str, Callable[[str], E]]
    image: Callable[[str], E] | None = None

    def error(self, failure: Failure, where: str, *, midway: bool = False) -> E:
        """The stage's error for `failure`, its message starting with `where` (the backend, its URL and model).
        `midway`: part of the answer had arrived, so an unavailable server is not worth asking again."""
        own = self.by_code.get(failure.code or "")
        if own is not None:
            return own(f"{where}: {failure.detail}")
        if failure.kind == "unavailable":
            late = " (after part of the answer had arrived)" if midway else ""
            return self.unavailable(
                f"{where} {failure.message}{late}",
                retry_after_s=failure.retry_after_s,
                retryable=failure.retryable and not midway,
            )
        if failure.kind == "image":
            return (self.image or self.rejected)(f"{where} {failure.message}")
        return (self.rejected if failure.kind == "rejected" else self.invalid)(f"{where} {failure.message}")


def _by_status(status: int | None, what: str) -> tuple[Literal["unavailable", "rejected"], str]:
    if status is not None and 400 <= status < 500 and status not in RETRYABLE_STATUSES:
        return "rejected", f"refused the request with {what}"
    return "unavailable", f"answered {what}"


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from a `Retry-After` header: delay-seconds or an HTTP date; None when absent or unreadable."""
    value = (headers.get("retry-after") or "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None
