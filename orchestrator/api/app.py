"""The FastAPI application: `create_app`, its lifespan, its middleware and every exception handler in one block.

The middleware, outermost first: `RequestContextMiddleware` (request id, body cap, deadline), `MetricsMiddleware`
(`orchestrator.observability.metrics`), `AuditMiddleware` (when `audit.path` is set: so that refused requests are
audited too), `SecurityMiddleware` (API keys, then rate limits; it adds the key id to the audit record),
`DisconnectMiddleware` (`orchestrator.api.disconnect`: a request whose client has gone is cancelled), then FastAPI's
own.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager, nullcontext
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.analysis.pipeline import Pipeline
from orchestrator.analysis.routing import KeywordRouter, Router
from orchestrator.analysis.sessions import build_sessions
from orchestrator.api.batch_routes import api as batch_api
from orchestrator.api.deps import Services
from orchestrator.api.disconnect import DisconnectMiddleware
from orchestrator.api.events import describe_error
from orchestrator.api.inputs import validation_problems
from orchestrator.api.routes import SCHEMA_MODELS, api
from orchestrator.api.web import web
from orchestrator.bulk.files import BulkStore
from orchestrator.bulk.runner import Batches, BatchRunner
from orchestrator.errors import ROOTS, ErrorSpec, OrchestratorError, RequestTooLarge, Unauthenticated, retry_after_s
from orchestrator.observability import logs
from orchestrator.observability.audit import AuditLog, AuditMiddleware
from orchestrator.observability.logs import accepted_request_id
from orchestrator.observability.metrics import Metrics, MetricsMiddleware, StateCollector
from orchestrator.observability.record import RequestRecord
from orchestrator.security.access import (
    ApiKeys,
    Limiter,
    LocalLimiter,
    RateLimiter,
    SecurityMiddleware,
    is_open,
)
from orchestrator.security.addresses import ClientAddresses
from orchestrator.security.fetch import ImageFetcher
from orchestrator.security.output_filter import OutputFilter
from orchestrator.settings import Settings
from orchestrator.stages.deadline import request_deadline
from orchestrator.stages.endpoints import EndpointStatus
from orchestrator.stages.resilient import endpoint_statuses
from orchestrator.wiring import Backends, build_backends, build_router, probe_limit
from stage_protocol.body_limit import capped, declared_length, too_large_message
from stage_protocol.server.collector import frozen_heap

log = logging.getLogger(__name__)

_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
NOT_READY_RETRY_AFTER_S = 5
AUDITED_PATHS = ("/v1/", "/infer", "/caption")
"""Path prefixes whose every request is audited (`orchestrator.observability.audit`): the API, not probes, docs or the
page."""


def create_app(settings: Settings, backends: Backends | None = None, router: Router | None = None) -> FastAPI:
    """An app serving `settings`. With `backends`, it uses those; without, its lifespan loads them from settings.

    Either way the app owns the backends and closes them at shutdown. With `router`, it routes with that one.
    Without, an app that loads its backends also builds the configured router (`settings.router`), while an app given
    `backends` routes with the `KeywordRouter`: injected backends are tests' and harnesses' fakes, which should not
    wait for an embedding model; pass `router=await build_router(settings.router)` for the configured one. An app
    that loads its backends keeps what the process then holds out of the garbage collector's walks while it serves
    (`stage_protocol.server.collector`).
    """

    keys = ApiKeys.parse(settings.api_keys.get_secret_value() if settings.api_keys else None)
    audit_log = _audit_log(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not keys.enabled:
            log.warning(
                "NO API KEYS CONFIGURED (ORCH_API_KEYS): every client that can reach this service can use it; "
                "set keys before exposing it beyond this machine"
            )
        async with AsyncExitStack() as stack:
            if audit_log is not None:
                await audit_log.start()
                stack.push_async_callback(audit_log.aclose)
            if settings.fetch.enabled:
                app.state.image_fetcher = ImageFetcher(settings.fetch, settings.limits.max_image_bytes)
                stack.push_async_callback(app.state.image_fetcher.aclose)
                stack.callback(setattr, app.state, "image_fetcher", None)
            async with _services(app, settings, backends, router), _batches(app, settings) as batches:
                app.state.batches = batches  # its workers stop before the services they call are closed
                # the models it loaded live as long as the app; an app given its backends leaves this to its caller
                with frozen_heap() if backends is None else nullcontext():
                    yield

    app = FastAPI(
        title="GLM vision orchestrator",
        version="0.1.0",
        description="Ask a question about an image: a vision stage looks, a reasoning stage thinks when needed.",
        lifespan=lifespan,
    )
    app.state.services = None
    app.state.image_fetcher = None
    app.state.batches = None
    app.state.started = time.time()
    app.state.metrics = _metrics(app)
    app.include_router(api)
    app.include_router(batch_api)
    app.include_router(web)
    app.add_api_route("/metrics", _scrape, methods=["GET"], summary="Prometheus metrics", response_class=Response)
    app.openapi = _openapi(app, SCHEMA_MODELS, secured=keys.enabled)  # type: ignore[method-assign]
    _register_exception_handlers(app)
    _add_middleware(app, settings, keys, audit_log)
    return app


def _metrics(app: FastAPI) -> Metrics:
    """The app's metrics, with breaker states read from its backends at scrape time."""
    metrics = Metrics()

    def statuses() -> dict[str, tuple[EndpointStatus, ...]]:
        services = app.state.services
        if services is None:
            return {}
        backends = services.backends
        return {"vision": endpoint_statuses(backends.vision), "reasoning": endpoint_statuses(backends.reasoning)}

    metrics.registry.register(StateCollector(statuses))
    return metrics


async def _scrape(request: Request) -> Response:
    """The Prometheus text exposition of the app's metrics (`orchestrator.observability.metrics` lists them)."""
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _add_middleware(app: FastAPI, settings: Settings, keys: ApiKeys, audit_log: AuditLog | None) -> None:
    """The module docstring's order; Starlette runs the middleware added last first."""
    app.add_middleware(DisconnectMiddleware)
    limits = settings.rate_limit
    addresses = ClientAddresses.from_settings(limits) if limits.per_address else None
    app.state.limiter = _limiter(settings)
    app.add_middleware(SecurityMiddleware, keys=keys, limiter=app.state.limiter, refuse=_refuse, addresses=addresses)
    if audit_log is not None:
        app.add_middleware(AuditMiddleware, log=audit_log, paths=AUDITED_PATHS)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics, paths=AUDITED_PATHS)
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.limits.max_request_bytes,
        deadline_s=settings.limits.request_deadline_s,
    )


@asynccontextmanager
async def _batches(app: FastAPI, settings: Settings) -> AsyncIterator[Batches]:
    """The Batch API's files and batches with their running workers: shared by the replicas through
    `ORCH_STATE__URL`, or this process's own (`ORCH_BATCH__DIRECTORY`, or a temporary directory)."""
    batch = settings.batch
    if settings.state.url:
        from orchestrator.bulk.shared import SharedBatches

        shared = SharedBatches(
            app, settings.state.url, workers=batch.workers * batch.concurrency, visibility_s=batch.visibility_s
        )
        shared.observe = app.state.metrics
        await shared.start()
        try:
            yield shared
        finally:
            app.state.batches = None
            await shared.aclose()
        return
    with contextlib.ExitStack() as folders:
        directory = settings.batch.directory or Path(folders.enter_context(tempfile.TemporaryDirectory("-batches")))
        runner = BatchRunner(
            app, BulkStore(directory), workers=settings.batch.workers, concurrency=settings.batch.concurrency
        )
        runner.observe = app.state.metrics
        runner.start()
        try:
            yield runner
        finally:
            app.state.batches = None
            await runner.aclose()


def _limiter(settings: Settings) -> Limiter:
    """The rate limits in this process, or shared by the replicas through `ORCH_STATE__URL`."""
    if settings.state.url:
        from orchestrator.security.shared_limits import RedisRateLimiter

        stale_after_s = settings.limits.request_deadline_s + 30.0
        return RedisRateLimiter(settings.state.url, settings.rate_limit, stale_after_s=stale_after_s)
    return LocalLimiter(RateLimiter(settings.rate_limit))


@asynccontextmanager
async def _services(
    app: FastAPI, settings: Settings, backends: Backends | None, router: Router | None
) -> AsyncIterator[None]:
    """The backends (given, or loaded from settings), the router and the pipeline, as `app.state.services`."""
    loaded = backends if backends is not None else await build_backends(settings)
    try:
        chosen = router if router is not None else await _default_router(settings, injected=backends is not None)
    except BaseException:
        await loaded.aclose()
        raise
    pipeline = Pipeline(
        loaded.vision,
        loaded.reasoning,
        settings.reasoning,
        chosen,
        probe_limit=probe_limit(settings),
        witness=loaded.witness,
        witness_timeout_s=settings.arbitration.witness_timeout_s,
    )
    answers = OutputFilter.from_settings(settings.output_filter)
    sessions = build_sessions(settings.sessions, settings.state.url)
    app.state.services = Services(settings, loaded, pipeline, sessions, answers)
    try:
        yield
    finally:
        app.state.services = None
        try:
            await sessions.aclose()
            close = getattr(app.state.limiter, "aclose", None)
            if close is not None:
                await close()
        finally:
            await loaded.aclose()


def _audit_log(settings: Settings) -> AuditLog | None:
    audit = settings.audit
    return AuditLog(audit.path, max_bytes=audit.max_bytes, backups=audit.backups) if audit.path else None


async def _default_router(settings: Settings, injected: bool) -> Router:
    return KeywordRouter() if injected else await build_router(settings.router)


def _openapi(app: FastAPI, models: tuple[type[BaseModel], ...], secured: bool) -> Callable[[], dict[str, Any]]:
    """FastAPI's OpenAPI description, with `models` (what bodies read by hand and event streams refer to) added to
    its components, and, when `secured`, the bearer key that every path but the open ones needs."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _, extra = models_json_schema(
                [(model, "validation") for model in models], ref_template="#/components/schemas/{model}"
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            schema["components"]["schemas"] = {**extra.get("$defs", {}), **components}
            _document_refusals(schema, secured)
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def _document_refusals(schema: dict[str, Any], secured: bool) -> None:
    """What `SecurityMiddleware` may answer on every path that is not open: 429, and with keys, 401 and the bearer
    scheme (which Swagger UI's "Authorize" button then asks for)."""
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    refusals = {"429": {"description": "Over the rate limits (`rate_limited`, `too_many_in_flight`)", "content": error}}
    if secured:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        refusals["401"] = {"description": "No valid API key (`api_key_missing`, `api_key_invalid`)", "content": error}
    for path, operations in schema.get("paths", {}).items():
        if is_open(path):
            continue
        for operation in operations.values():
            if secured:
                operation["security"] = [{"bearer": []}]
            for status, response in refusals.items():
                operation.setdefault("responses", {}).setdefault(status, response)


def error_response(request: Request, spec: ErrorSpec, message: str, retry_after: float | None = None) -> JSONResponse:
    record = RequestRecord.of(request.scope)
    record.error_type = spec.type
    headers = {"X-Request-ID": record.request_id}
    if spec.status == 503 or retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after if retry_after is not None else NOT_READY_RETRY_AFTER_S)))
    body = {"error": {"type": spec.type, "message": message, "request_id": record.request_id}}
    return JSONResponse(body, status_code=spec.status, headers=headers)


def exception_response(request: Request, exc: BaseException) -> JSONResponse:
    """The error response for `exc`: its table row, message, `Retry-After` and `WWW-Authenticate` when it has them."""
    spec, message = describe_error(exc, RequestRecord.of(request.scope).request_id)
    response = error_response(request, spec, message, retry_after_s(exc))
    if isinstance(exc, Unauthenticated):
        response.headers["WWW-Authenticate"] = exc.challenge
    return response


async def _refuse(scope: Scope, receive: Receive, send: Send, exc: OrchestratorError) -> None:
    """`SecurityMiddleware`'s refusals, in the same format as every other error."""
    await exception_response(Request(scope), exc)(scope, receive, send)


def _register_exception_handlers(app: FastAPI) -> None:
    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        return exception_response(request, exc)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        spec = ErrorSpec(exc.status_code, _HTTP_TYPES.get(exc.status_code, "http_error"))
        response = error_response(request, spec, str(exc.detail))
        if exc.headers and "Allow" in exc.headers:  # a 405: the methods the path takes (RFC 9110 §15.5.6)
            response.headers["Allow"] = exc.headers["Allow"]
        return response

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(request, ErrorSpec(422, "validation_error"), validation_problems(exc.errors()))

    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    for root in (*ROOTS, Exception):  # `Exception` is served outside the middleware, by Starlette's last resort
        app.add_exception_handler(root, on_error)


class RequestContextMiddleware:
    """Opens every request's record (`orchestrator.observability.record`) with its id (returned as `X-Request-ID`),
    caps the body at `max_body_bytes`, and sets the request's deadline (`orchestrator.stages.deadline`), which a
    streamed response lives inside too.

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
        request_id = accepted_request_id(_header(scope, b"x-request-id"))
        RequestRecord.open(scope, request_id)
        token = logs.request_id.set(request_id)
        try:
            await self._serve(scope, receive, send, request_id)
        finally:
            logs.request_id.reset(token)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                if not any(name.lower() == b"x-request-id" for name, _ in headers):
                    headers.append((b"x-request-id", request_id.encode()))
            await send(message)

        declared = declared_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            message = too_large_message(declared, self.max_body_bytes)
            response = error_response(Request(scope), ErrorSpec(413, "request_too_large"), message)
            await response(scope, receive, send_with_id)
            return
        with request_deadline(self.deadline_s):
            await self.app(scope, capped(receive, self.max_body_bytes, RequestTooLarge), send_with_id)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return bytes(value).decode("latin-1")
    return None
