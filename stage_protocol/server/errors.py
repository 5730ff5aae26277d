"""Errors as a stage server sends them: OpenAI's shape `{"error": {"message", "type", "param", "code"}}`, with the
HTTP status and the stable `code` slug of one table per stage (`ErrorTable`).

A request the server refuses before any backend sees it is an `ApiError`; request validation is 400
`invalid_request` (or `invalid_json`), Starlette's own HTTP errors keep their status (404, 405, 413); an error of the
stage's tree gets the status its table gives it; anything else is 500 `internal_error`, logged with its traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from stage_protocol.errors import Unavailable

E = TypeVar("E", bound=Exception)
DEFAULT_RETRY_AFTER_S = 5.0
"""The Retry-After of an unavailable backend that named no time of its own, and of an unhealthy one."""


class Status(NamedTuple):
    """An HTTP status and the stable OpenAI `code` slug that goes with it."""

    status: int
    code: str


INVALID_REQUEST = Status(400, "invalid_request")
INVALID_JSON = Status(400, "invalid_json")
REQUEST_TOO_LARGE = Status(413, "request_too_large")
INTERNAL_ERROR = Status(500, "internal_error")
HTTP_STATUSES = {404: "not_found", 405: "method_not_allowed", 413: REQUEST_TOO_LARGE.code}


class ApiError(Exception):
    """A request the server refuses before any backend sees it."""

    def __init__(self, status: Status, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


@dataclass(frozen=True)
class Failure:
    """An error as the client gets it: status and code, message, the offending parameter, when to retry."""

    status: Status
    message: str
    param: str | None = None
    retry_after_s: float | None = None

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status.code}}

    def response(self) -> JSONResponse:
        retry = self.retry_after_s
        headers = {"Retry-After": str(max(1, round(retry)))} if retry is not None else None
        return JSONResponse(self.body(), status_code=self.status.status, headers=headers)


@dataclass(frozen=True)
class ErrorTable(Generic[E]):
    """A stage's errors as its server reports them: `statuses` gives every error of the tree under `root` its status
    and code (a test of each stage checks every leaf is there); `stage` (`vision`) names the stage in messages, and
    `log` is where 5xx are logged."""

    stage: str
    root: type[E]
    statuses: Mapping[type[E], Status]
    log: logging.Logger

    def failure_of(self, exc: Exception) -> Failure:
        """How `exc` is reported to the client; 5xx are logged, unknown errors with their traceback. An
        `Unavailable` error says when to retry: when its server said, else after `DEFAULT_RETRY_AFTER_S`."""
        if isinstance(exc, ApiError):
            return Failure(exc.status, str(exc), exc.param)
        status = next((self.statuses[cls] for cls in type(exc).__mro__ if cls in self.statuses), None)
        if status is None:
            self.log.error("internal error: %s: %s", type(exc).__name__, exc, exc_info=exc)
            return Failure(INTERNAL_ERROR, f"internal error in the {self.stage} stage server; see its log")
        if status.status >= 500:
            self.log.warning("%s backend failed: %s: %s", self.stage, type(exc).__name__, exc)
        retry = (exc.retry_after_s or DEFAULT_RETRY_AFTER_S) if isinstance(exc, Unavailable) else None
        return Failure(status, str(exc), retry_after_s=retry)


def install_error_handlers(
    app: FastAPI, failure_of: Callable[[Exception], Failure], roots: tuple[type[Exception], ...]
) -> None:
    """Every error becomes an OpenAI-shaped JSON response: request validation (400), Starlette's HTTP errors (404,
    405, 413 for a body over the limit) and, through `failure_of`, `ApiError`, the stage's `roots` and the rest."""

    async def on_error(request: Request, exc: Exception) -> Response:
        return failure_of(exc).response()

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return validation_failure(exc.errors()).response()

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = HTTP_STATUSES.get(exc.status_code, "http_error")
        return Failure(Status(exc.status_code, code), str(exc.detail)).response()

    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    handled: tuple[type[Exception], ...] = (ApiError, *roots, Exception)
    for root in handled:  # `Exception` is served by Starlette's last resort, which then re-raises it to the server
        app.add_exception_handler(root, on_error)


def validation_failure(errors: Sequence[Any]) -> Failure:
    """A body that is not JSON (400 `invalid_json`) or does not fit the request model (400 `invalid_request`, `param`
    naming the first offending field, as `messages.0.role`)."""
    if any(error["type"] == "json_invalid" for error in errors):
        return Failure(INVALID_JSON, f"the body is not valid JSON: {errors[0].get('ctx', {}).get('error')}")
    fields = [".".join(str(part) for part in error["loc"] if part != "body") for error in errors]
    message = "; ".join(f"{field or 'body'}: {error['msg']}" for field, error in zip(fields, errors, strict=True))
    return Failure(INVALID_REQUEST, message, (fields[0] or None) if fields else None)
