"""The orchestrator's errors and the one table that maps every error to an HTTP status and a stable `type` slug.

The orchestrator's own tree::

    OrchestratorError
    ├── RequestInvalid                the request is malformed (the caller's fault)
    │   ├── InvalidJson               a JSON body that does not parse
    │   ├── InvalidMultipart          a multipart body that does not parse, or has too many parts
    │   ├── ImageMissing              no image in the request (or more than one)
    │   ├── TooManyImages             a chat message with more than one image (the vision stage looks at one)
    │   ├── InvalidBase64             `image_base64` or a data: URL's payload is not valid base64
    │   ├── InvalidDataUrl            a data: URL that is not `data:image/...;base64,...`
    │   ├── ImageUrlNotSupported      an http(s) or other URL scheme this deployment does not fetch
    │   ├── ImageUrlError             an http(s) image URL that could not be fetched (`orchestrator.security.fetch`)
    │   │   ├── ImageUrlInvalid           malformed, with credentials, or redirecting to a URL we do not fetch
    │   │   ├── ImageUrlForbidden         its host resolves to a private, loopback, metadata… address
    │   │   ├── ImageUrlUnreachable       the name does not resolve, or no connection could be made
    │   │   ├── ImageUrlTimeout           the whole fetch took longer than `fetch.timeout_s`
    │   │   ├── ImageUrlTooManyRedirects  more redirects than `fetch.max_redirects`
    │   │   ├── ImageUrlBadStatus         the server answered something other than 2xx
    │   │   └── ImageUrlNotImage          the server answered with a content type that is not an image
    │   ├── RequestTooLarge           the body is larger than the configured limit
    │   ├── UnsupportedMediaType      a body that is neither JSON nor multipart/form-data
    │   ├── ValidationFailed          fields missing, of the wrong type, or unknown
    │   ├── ParameterNotSupported     a known OpenAI field asking for what this service cannot give (`logprobs`)
    │   └── SessionNotFound           a `session_id` that is expired, evicted, or not the caller's
    ├── Unauthenticated               no valid API key (401, with `WWW-Authenticate: Bearer`)
    │   ├── ApiKeyMissing             no `Authorization` header
    │   └── ApiKeyInvalid             a malformed `Authorization` header, or a key that is not configured
    ├── Throttled                     over a key's or an address's limit (429, with `Retry-After`)
    │   ├── RateLimited               the key's token bucket is empty
    │   └── TooManyInFlight           the key (or address) already has `rate_limit.max_concurrent` in flight
    └── NotReady                      the backends are not loaded (yet, or any more)

Errors of the stages (`vision_stage.errors`, `reasoning_stage.errors`) are mapped in the same table. Anything not in
the table is an internal error (500, `internal_error`) and is logged with its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass

from reasoning_stage import errors as reasoning
from vision_stage import errors as vision


class OrchestratorError(Exception):
    """Root of the orchestrator's own errors."""


class RequestInvalid(OrchestratorError):
    """The request is malformed."""


class InvalidJson(RequestInvalid):
    """A JSON body that does not parse."""


class InvalidMultipart(RequestInvalid):
    """A multipart body that does not parse."""


class ImageMissing(RequestInvalid):
    """No image in the request."""


class TooManyImages(RequestInvalid):
    """A chat message with more than one image: the vision stage looks at one image per request."""


class InvalidBase64(RequestInvalid):
    """Base64 that does not decode."""


class InvalidDataUrl(RequestInvalid):
    """A data: URL of the wrong shape."""


class ImageUrlNotSupported(RequestInvalid):
    """A URL this deployment does not fetch."""


class ImageUrlError(RequestInvalid):
    """An http(s) image URL that could not be fetched."""


class ImageUrlInvalid(ImageUrlError):
    """A malformed image URL, one with credentials, or a redirect to a URL that is not fetched."""


class ImageUrlForbidden(ImageUrlError):
    """The URL's host resolves to an address that is not fetched (private, loopback, metadata…)."""


class ImageUrlUnreachable(ImageUrlError):
    """The URL's host does not resolve, or no connection to it could be made."""


class ImageUrlTimeout(ImageUrlError):
    """The fetch took longer than allowed."""


class ImageUrlTooManyRedirects(ImageUrlError):
    """More redirects than allowed."""


class ImageUrlBadStatus(ImageUrlError):
    """The server answered with a status other than 2xx."""


class ImageUrlNotImage(ImageUrlError):
    """The server answered with something that is not an image."""


class RequestTooLarge(RequestInvalid):
    """A body over the configured limit."""


class UnsupportedMediaType(RequestInvalid):
    """A body that is neither JSON nor multipart."""


class ValidationFailed(RequestInvalid):
    """Fields missing, of the wrong type, or unknown."""


class ParameterNotSupported(RequestInvalid):
    """A known OpenAI field set to ask for something this service cannot give (e.g. `logprobs: true`)."""


class Unauthenticated(OrchestratorError):
    """No valid API key. `challenge` is the `WWW-Authenticate` header value (RFC 6750)."""

    challenge = "Bearer"


class ApiKeyMissing(Unauthenticated):
    """No `Authorization` header."""


class ApiKeyInvalid(Unauthenticated):
    """A malformed `Authorization` header, or a key that is not configured."""

    challenge = 'Bearer error="invalid_token"'


class Throttled(OrchestratorError):
    """Over a per-key limit; `retry_after_s` says when to try again."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RateLimited(Throttled):
    """The key's (or the address's) request rate is over its limit."""


class TooManyInFlight(Throttled):
    """The key has as many requests in flight as it may."""


class SessionNotFound(RequestInvalid):
    """A session id this caller has no live session under."""


class FileNotFound(RequestInvalid):
    """A batch file id this caller has no file under."""


class BatchNotFound(RequestInvalid):
    """A batch id this caller has no batch under."""


class BatchInvalid(RequestInvalid):
    """A batch or batch file the Batch API cannot take (its purpose, endpoint or window)."""


class SessionsUnavailable(OrchestratorError):
    """The shared session store (Redis) failed or did not answer in time; `retry_after_s` says when to try again."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BatchesUnavailable(OrchestratorError):
    """The shared batch store (Redis) failed or did not answer in time; `retry_after_s` says when to try again."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class LimitsUnavailable(OrchestratorError):
    """The shared rate limits (Redis) failed and `rate_limit.on_state_failure` is `closed`."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReady(OrchestratorError):
    """The backends are not loaded."""


@dataclass(frozen=True)
class ErrorSpec:
    status: int
    type: str


ERROR_TABLE: dict[type[Exception], ErrorSpec] = {
    InvalidJson: ErrorSpec(400, "invalid_json"),
    InvalidMultipart: ErrorSpec(400, "invalid_multipart"),
    ImageMissing: ErrorSpec(400, "image_missing"),
    TooManyImages: ErrorSpec(400, "too_many_images"),
    InvalidBase64: ErrorSpec(400, "invalid_base64"),
    InvalidDataUrl: ErrorSpec(400, "invalid_data_url"),
    ImageUrlNotSupported: ErrorSpec(400, "image_url_not_supported"),
    ImageUrlInvalid: ErrorSpec(400, "image_url_invalid"),
    ImageUrlForbidden: ErrorSpec(403, "image_url_forbidden"),
    ImageUrlUnreachable: ErrorSpec(400, "image_url_unreachable"),
    ImageUrlTimeout: ErrorSpec(400, "image_url_timeout"),
    ImageUrlTooManyRedirects: ErrorSpec(400, "image_url_too_many_redirects"),
    ImageUrlBadStatus: ErrorSpec(400, "image_url_bad_status"),
    ImageUrlNotImage: ErrorSpec(415, "image_url_not_image"),
    RequestTooLarge: ErrorSpec(413, "request_too_large"),
    UnsupportedMediaType: ErrorSpec(415, "unsupported_media_type"),
    ValidationFailed: ErrorSpec(422, "validation_error"),
    ParameterNotSupported: ErrorSpec(400, "unsupported_parameter"),
    ApiKeyMissing: ErrorSpec(401, "api_key_missing"),
    ApiKeyInvalid: ErrorSpec(401, "api_key_invalid"),
    RateLimited: ErrorSpec(429, "rate_limited"),
    TooManyInFlight: ErrorSpec(429, "too_many_in_flight"),
    SessionNotFound: ErrorSpec(404, "session_not_found"),
    FileNotFound: ErrorSpec(404, "file_not_found"),
    BatchNotFound: ErrorSpec(404, "batch_not_found"),
    BatchInvalid: ErrorSpec(400, "invalid_batch"),
    SessionsUnavailable: ErrorSpec(503, "sessions_unavailable"),
    LimitsUnavailable: ErrorSpec(503, "rate_limits_unavailable"),
    BatchesUnavailable: ErrorSpec(503, "batches_unavailable"),
    NotReady: ErrorSpec(503, "not_ready"),
    vision.ImageEmpty: ErrorSpec(400, "image_empty"),
    vision.ImageTooLarge: ErrorSpec(413, "image_too_large"),
    vision.ImageTooManyPixels: ErrorSpec(413, "image_too_many_pixels"),
    vision.ImageUnsupported: ErrorSpec(415, "image_unsupported"),
    vision.ImageCorrupt: ErrorSpec(400, "image_corrupt"),
    vision.VisionUnavailable: ErrorSpec(503, "vision_unavailable"),
    vision.VisionOverloaded: ErrorSpec(503, "overloaded"),
    vision.VisionRejected: ErrorSpec(502, "vision_rejected"),
    vision.VisionInvalidOutput: ErrorSpec(502, "vision_invalid_output"),
    reasoning.ReasoningDisabled: ErrorSpec(503, "reasoning_disabled"),
    reasoning.ReasoningUnavailable: ErrorSpec(503, "reasoning_unavailable"),
    reasoning.ReasoningOverloaded: ErrorSpec(503, "reasoning_overloaded"),
    reasoning.ReasoningRejected: ErrorSpec(502, "reasoning_rejected"),
    reasoning.ReasoningInvalidOutput: ErrorSpec(502, "reasoning_invalid_output"),
    reasoning.ReasoningModelError: ErrorSpec(503, "reasoning_model_error"),
}

INTERNAL_ERROR = ErrorSpec(500, "internal_error")

ROOTS: tuple[type[Exception], ...] = (OrchestratorError, vision.VisionError, reasoning.ReasoningError)
"""The roots whose every leaf must be in ERROR_TABLE (a test checks it)."""


def spec_for(exc: BaseException) -> ErrorSpec:
    """The status and slug for `exc`: the nearest class in its MRO that the table names."""
    for cls in type(exc).__mro__:
        spec = ERROR_TABLE.get(cls)
        if spec is not None:
            return spec
    return INTERNAL_ERROR


def retry_after_s(exc: BaseException) -> float | None:
    """Seconds a client should wait before retrying, when the error says so."""
    value = getattr(exc, "retry_after_s", None)
    return float(value) if isinstance(value, int | float) else None
