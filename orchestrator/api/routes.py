"""The HTTP endpoints: thin handlers over the pipeline."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from orchestrator.api.deps import ServicesDep
from orchestrator.api.inputs import read_analyze_request
from orchestrator.api.schemas import AnalyzeResponse, ErrorResponse, analyze_response
from orchestrator.errors import ValidationFailed
from orchestrator.pipeline import AnalyzeInput
from vision_stage.images import ImageLimits, decode_image

api = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Malformed request or image (`image_missing`, `invalid_base64`, `invalid_data_url`, `invalid_json`, "
        "`invalid_multipart`, `image_url_not_supported`, `image_empty`, `image_corrupt`)",
        413: "Too large (`request_too_large`, `image_too_large`, `image_too_many_pixels`)",
        415: "Not an accepted image or body type (`image_unsupported`, `unsupported_media_type`)",
        422: "Missing, invalid or unknown fields (`validation_error`)",
        502: "The vision stage answered something unusable (`vision_invalid_output`)",
        503: "Not ready, or the vision stage is unavailable (`not_ready`, `vision_unavailable`); see Retry-After",
    }.items()
}

_ANALYZE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "question"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "question": {"type": "string"},
                        "mode": {"type": "string", "enum": ["auto", "vision", "reasoning"], "default": "auto"},
                        "profile": {
                            "type": "string",
                            "enum": ["general", "medical", "legal", "finance"],
                            "default": "general",
                        },
                        "response_format": {"type": "string", "enum": ["text", "json"], "default": "text"},
                    },
                }
            },
            "application/json": {"schema": {"$ref": "#/components/schemas/AnalyzeJsonRequest"}},
        },
    }
}


class HealthResponse(BaseModel):
    status: str


class StageReadiness(BaseModel):
    backend: str
    model: str
    ok: bool
    detail: str


class ReadyResponse(BaseModel):
    ready: bool
    vision: StageReadiness
    reasoning: StageReadiness


@api.get("/health", response_model=HealthResponse, summary="The process is alive")
async def health() -> HealthResponse:
    return HealthResponse(status="ok")


@api.get(
    "/ready",
    response_model=ReadyResponse,
    summary="Models loaded and stages healthy",
    responses={503: {"model": ReadyResponse, "description": "Not ready; see each stage's detail"}},
)
async def ready(services: ServicesDep) -> JSONResponse:
    backends = services.backends
    vision_health, reasoning_health = await asyncio.gather(backends.vision.health(), backends.reasoning.health())
    body = ReadyResponse(
        ready=vision_health.ok and reasoning_health.ok,
        vision=StageReadiness(backend=backends.vision.name, model=backends.vision.model, **vars(vision_health)),
        reasoning=StageReadiness(
            backend=backends.reasoning.name, model=backends.reasoning.model, **vars(reasoning_health)
        ),
    )
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@api.post(
    "/v1/analyze",
    response_model=AnalyzeResponse,
    responses=_ERRORS,
    openapi_extra=_ANALYZE_BODY,
    summary="Answer a question about an image",
    description="Multipart (`image` file, `question`, `mode`, `profile`, `response_format`) or JSON (`image_base64` "
    "or a `data:` `image_url`, `question`, `mode`, `profile`, `response_format`).",
)
async def analyze(request: Request, services: ServicesDep) -> AnalyzeResponse:
    limits = services.settings.limits
    inputs = await read_analyze_request(request, limits.max_image_bytes)
    question = inputs.options.question.strip()
    if not question:
        raise ValidationFailed("question: must not be blank")
    if len(question) > limits.max_question_chars:
        raise ValidationFailed(f"question: {len(question)} characters; the limit is {limits.max_question_chars}")
    options = inputs.options
    image_limits = ImageLimits(max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels)
    # Route while the image decodes, both off the event loop: routing then adds only what outlasts the decoding.
    routing = asyncio.create_task(services.pipeline.route(question, options.mode, options.response_format))
    try:
        image = await asyncio.to_thread(decode_image, inputs.image, image_limits)
    finally:
        routed = await routing  # never cancelled mid-query: a bad image waits for at most one routing call
    analysis = AnalyzeInput(
        image, question, mode=options.mode, profile=options.profile, response_format=options.response_format
    )
    outcome = await services.pipeline.run(analysis, routed)
    return analyze_response(outcome, str(request.scope["state"]["request_id"]))
