"""The request record: one typed record per API request, which the layers that serve it read and write in the open.

`RequestContextMiddleware` (`orchestrator.api.app`) opens it as the request arrives and keeps it in the ASGI scope
(`RequestRecord.of(scope)`); the security layer sets `key_id`; an error response sets `error_type`; the API layer
records the analysis it ran (`analysed`, `captioned`) once the pipeline has returned its outcome; the metrics
middleware counts the finished request from it and the audit middleware writes it (`line`).

What the analysis part keeps is what a reviewer needs and nothing a leak could hurt: SHA-256 digests of the inputs
(image, question) and of the answer — never the image, the text or a key — the route, the stages and backends used,
the outcome, and the degraded / disclaimer / human-review flags.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from orchestrator.analysis.types import AnalyzeInput, AnalyzeOutcome
    from vision_stage.types import DecodedImage, VisionResult

SCOPE_KEY = "record"
"""Where the record lives in the ASGI scope's `state` (what Starlette's `request.state` reads)."""


def digest(data: bytes | str) -> str:
    """`sha256:` and the hex digest of `data` (text as UTF-8)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return "sha256:" + hashlib.sha256(raw).hexdigest()


@dataclass
class RequestRecord:
    request_id: str
    endpoint: str
    """`METHOD /path`."""
    client: str | None
    """The peer's `host:port`, as the server saw it."""
    time: float = field(default_factory=lambda: round(time.time(), 3))
    """When the request arrived (Unix seconds)."""
    key_id: str | None = None
    """The API key's id, once authenticated (`orchestrator.security.access`)."""
    status: int | None = None
    error_type: str | None = None
    """The error `type` slug of an error response."""
    error: str | None = None
    """The class name of an exception that escaped every handler (answered 500 by the server's last resort)."""
    duration_ms: float | None = None
    analysis: dict[str, object] = field(default_factory=dict)
    """What the request's analysis (or caption) was: `analysis_fields`, `caption_fields`."""

    @classmethod
    def open(cls, scope: Scope, request_id: str) -> RequestRecord:
        """A new record for the request of `scope`, kept in it from now on."""
        client = scope.get("client")
        endpoint = f"{scope.get('method', '-')} {scope.get('path', '')}"
        record = cls(request_id, endpoint, f"{client[0]}:{client[1]}" if client else None)
        scope.setdefault("state", {})[SCOPE_KEY] = record
        return record

    @classmethod
    def of(cls, scope: Scope) -> RequestRecord:
        """The request's record: the one opened for it, or a new one (for a middleware serving an app without
        `RequestContextMiddleware`, which opens them)."""
        record = scope.get("state", {}).get(SCOPE_KEY)
        return record if isinstance(record, RequestRecord) else cls.open(scope, "-")

    def analysed(self, request: AnalyzeInput, outcome: AnalyzeOutcome) -> None:
        self.analysis = analysis_fields(request, outcome)

    def captioned(self, image: DecodedImage, vision: VisionResult) -> None:
        self.analysis = caption_fields(image, vision)

    @property
    def outcome(self) -> str:
        """`ok`, `degraded`, the error `type` of a failed request, or `http_<status>` when none was recorded."""
        if self.error_type:
            return self.error_type
        if (self.status or 0) >= 400:
            return f"http_{self.status}"
        return "degraded" if self.analysis.get("degraded") else "ok"

    def line(self) -> dict[str, object]:
        """The audit log's line: the request, then its analysis; fields never set are left out."""
        head: dict[str, object] = {"time": self.time, "endpoint": self.endpoint, "client": self.client}
        for name in ("key_id", "status", "error_type", "error"):
            if (value := getattr(self, name)) is not None:
                head[name] = value
        return {**head, **self.analysis, "request_id": self.request_id, "duration_ms": self.duration_ms}


def analysis_fields(request: AnalyzeInput, outcome: AnalyzeOutcome) -> dict[str, object]:
    """What the record keeps of one analysis: digests of what came in and went out, never the content."""
    reasoning = outcome.reasoning
    return {
        "image": "sha256:" + request.image.sha256,
        "image_bytes": request.image.byte_size,
        "question": digest(request.question),
        "profile": request.profile,
        "route": outcome.route.decision,
        "route_forced": outcome.route.forced,
        "mode": outcome.mode,
        "vision": f"{outcome.vision.backend}:{outcome.vision.model}",
        "reasoning": f"{reasoning.backend}:{reasoning.model}" if reasoning else None,
        "degraded": outcome.degraded,
        "failures": [f"{f.stage}:{f.backend}:{f.error_type}" for f in outcome.failures],
        "arbitration": outcome.arbitration.status if outcome.arbitration else None,
        "answer": digest(outcome.answer),
        "disclaimer": outcome.disclaimer is not None,
        "needs_human_review": outcome.needs_human_review,
        "vision_cached": outcome.vision.cached,
        "timings_ms": dict(outcome.timings_ms),
    }


def caption_fields(image: DecodedImage, vision: VisionResult) -> dict[str, object]:
    """What the record keeps of a caption (`POST /caption`)."""
    return {
        "image": "sha256:" + image.sha256,
        "image_bytes": image.byte_size,
        "mode": "caption",
        "vision": f"{vision.backend}:{vision.model}",
        "degraded": vision.fallback is not None,
        "answer": digest(vision.caption),
    }


class RecordingMiddleware:
    """An ASGI middleware over the requests under `paths` (others pass through untouched), given each one's record
    with its status kept as the response starts. A subclass does its part in `serve`."""

    def __init__(self, app: ASGIApp, paths: tuple[str, ...]) -> None:
        self.app = app
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.paths):
            await self.app(scope, receive, send)
            return
        record = RequestRecord.of(scope)

        async def send_with_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
            await send(message)

        await self.serve(record, scope, receive, send_with_status)

    async def serve(self, record: RequestRecord, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError
