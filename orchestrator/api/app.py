"""The FastAPI application: `create_app`, its lifespan, its middleware and every exception handler in one block."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.api.deps import Services
from orchestrator.api.events import describe_error
from orchestrator.api.inputs import validation_problems
from orchestrator.api.routes import SCHEMA_MODELS, api
from orchestrator.errors import ROOTS, ErrorSpec, RequestTooLarge, retry_after_s
from orchestrator.pipeline import Pipeline
from orchestrator.resilience.deadline import request_deadline
from orchestrator.routing import KeywordRouter, Router
from orchestrator.settings import Settings
from orchestrator.wiring import Backends, build_backends, build_router, probe_limit

log = logging.getLogger(__name__)

_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
NOT_READY_RETRY_AFTER_S = 5


def create_app(settings: Settings, backends: Backends | None = None, router: Router | None = None) -> FastAPI:
    """An app serving `settings`. With `backends`, it uses those; without, its lifespan loads them from settings.

    Either way the app owns the backends and closes them at shutdown. With `router`, it routes with that one. Without,
    an app that loads its backends also builds the configured router (`settings.router`), while an app given
    `backends` routes with the `KeywordRouter`: injected backends are tests' and harnesses' fakes, which should not
    wait for an embedding model; pass `router=await build_router(settings.router)` for the configured one.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = backends if backends is not None else await build_backends(settings)
        try:
            chosen = router if router is not None else await _default_router(settings, injected=backends is not None)
        except BaseException:
            await loaded.aclose()
            raise
        pipeline = Pipeline(
            loaded.vision, loaded.reasoning, settings.reasoning, chosen, probe_limit=probe_limit(settings)
        )
        app.state.services = Services(settings, loaded, pipeline)
        try:
            yield
        finally:
            app.state.services = None
            await loaded.aclose()

    app = FastAPI(
        title="GLM vision orchestrator",
        version="0.1.0",
        description="Ask a question about an image: a vision stage looks, a reasoning stage thinks when needed.",
        lifespan=lifespan,
    )
    app.state.services = None
    app.state.started = time.time()
    app.include_router(api)
    app.openapi = _openapi(app, SCHEMA_MODELS)  # type: ignore[method-assign]
    _register_exception_handlers(app)
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.limits.max_request_bytes,
        deadline_s=settings.limits.request_deadline_s,
    )
    return app


async def _default_router(settings: Settings, injected: bool) -> Router:
    return KeywordRouter() if injected else await build_router(settings.router)


def _openapi(app: FastAPI, models: tuple[type[BaseModel], ...]) -> Callable[[], dict[str, Any]]:
    """FastAPI's OpenAPI description, with `models` (what bodies read by hand and event streams refer to) added to
    its components."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _, extra = models_json_schema(
                [(model, "validation") for model in models], ref_template="#/components/schemas/{model}"
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            schema["components"]["schemas"] = {**extra.get("$defs", {}), **components}
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def request_id_of(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", "-"))


def error_response(request: Request, spec: ErrorSpec, message: str, retry_after: float | None = None) -> JSONResponse:
    headers = {"X-Request-ID": request_id_of(request)}
    if spec.status == 503 or retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after if retry_after is not None else NOT_READY_RETRY_AFTER_S)))
    body = {"error": {"type": spec.type, "message": message, "request_id": request_id_of(request)}}
    return JSONResponse(body, status_code=spec.status, headers=headers)


def _register_exception_handlers(app: FastAPI) -> None:
    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        spec, message = describe_error(exc, request_id_of(request))
        return error_response(request, spec, message, retry_after_s(exc))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        spec = ErrorSpec(exc.status_code, _HTTP_TYPES.get(exc.status_code, "http_error"))
        return error_response(request, spec, str(exc.detail))

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(request, ErrorSpec(422, "validation_error"), validation_problems(exc.errors()))

    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    for root in (*ROOTS, Exception):  # `Exception` is served outside the middleware, by Starlette's last resort
        app.add_exception_handler(root, on_error)


class RequestContextMiddleware:
    """Gives every request an id (returned as `X-Request-ID`), caps the body at `max_body_bytes`, and sets the
    request's deadline (`orchestrator.resilience.deadline`), which a streamed response lives inside too.

    A declared `Content-Length` over the cap is refused before the body is read; a body that grows past the cap while
    streaming raises `RequestTooLarge` inside the handler that reads it.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, deadline_s: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.deadline_s = deadline_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                if not any(name.lower() == b"x-request-id" for name, _ in headers):
                    headers.append((b"x-request-id", request_id.encode()))
            await send(message)

        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            request = Request(scope)
            spec = ErrorSpec(413, "request_too_large")
            response = error_response(
                request, spec, f"the body has {declared} bytes; the limit is {self.max_body_bytes}"
            )
            await response(scope, receive, send_with_id)
            return
        with request_deadline(self.deadline_s):
            await self.app(scope, self._capped(receive), send_with_id)

    def _capped(self, receive: Receive) -> Receive:
        seen = 0

        async def capped_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise RequestTooLarge(f"the body is larger than the limit of {self.max_body_bytes} bytes")
            return message

        return capped_receive


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
