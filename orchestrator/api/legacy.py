"""The endpoints of the original write-ups, kept working on top of the pipeline.

- `POST /infer`, JSON `{"image_url", "prompt"}`: the prompt is routed and answered as `/v1/analyze` does in mode
  `auto`; the answer is the write-ups' "generated text and confidence" (`answer`, `confidence`) with how it was
  reached (`InferResponse`). `image_url` is read by the helper `/v1/analyze` reads its JSON `image_url` with.
- `POST /caption`, multipart with one `file`: the vision stage's `caption` task, `{"caption", ...}`.

Both have `/v1/analyze`'s errors, status for status and with the same body, and their answers leave through the
output filter.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from orchestrator.analysis.routing import Decision
from orchestrator.analysis.types import AnalyzeOutcome, Options
from orchestrator.api.inputs import read_form
from orchestrator.api.intake import IntakeDep
from orchestrator.api.render import usage_fields
from orchestrator.api.schemas import (
    ERROR_RESPONSES,
    EXAMPLE_IMAGE_URL,
    FILE_PART,
    RouteOut,
    UsageOut,
    form,
    request_body,
)
from orchestrator.errors import ImageMissing, UnsupportedMediaType, ValidationFailed
from vision_stage.types import VisionResult

api = APIRouter()

CAPTION_FIELD = "file"


class InferRequest(BaseModel):
    """`POST /infer`: the request of the original write-ups."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"image_url": EXAMPLE_IMAGE_URL, "prompt": "What is the total?"}]},
    )

    image_url: str = Field(
        description="The image: a `data:image/...;base64,...` URL, or an http(s) URL where this deployment fetches "
        "them (otherwise 400 `image_url_not_supported`)."
    )
    prompt: str = Field(min_length=1, description="The question about the image; routed as `/v1/analyze` does.")


class InferResponse(BaseModel):
    """`POST /infer`: the generated text and its confidence, as the write-ups returned, with how it was reached."""

    request_id: str
    answer: str = Field(description="The generated text: `/v1/analyze`'s `answer`.")
    confidence: float = Field(description="0–1, as in `/v1/analyze`.")
    mode: Decision = Field(description="What actually ran.")
    route: RouteOut
    degraded: bool = Field(description="True when a stage the route wanted failed and a fallback answered.")
    notices: list[str]
    needs_human_review: bool
    language: Literal["zh", "en"]
    timings_ms: dict[str, float]
    usage: UsageOut


class CaptionResponse(BaseModel):
    """`POST /caption`: the vision stage's one-sentence caption."""

    request_id: str
    caption: str
    backend: str = Field(description="The vision backend that answered.")
    model: str
    degraded: bool = Field(description="True when a fallback vision backend answered in place of the configured one.")
    latency_ms: float


def infer_response(outcome: AnalyzeOutcome, request_id: str) -> InferResponse:
    return InferResponse(
        request_id=request_id, answer=outcome.answer, confidence=outcome.confidence, mode=outcome.mode,
        route=RouteOut(**vars(outcome.route)), degraded=outcome.degraded, notices=list(outcome.notices),
        needs_human_review=outcome.needs_human_review, language=outcome.language, timings_ms=outcome.timings_ms,
        usage=usage_fields(outcome),
    )  # fmt: skip


def caption_response(vision: VisionResult, request_id: str) -> CaptionResponse:
    return CaptionResponse(
        request_id=request_id, caption=vision.caption, backend=vision.backend, model=vision.model,
        degraded=vision.fallback is not None, latency_ms=vision.latency_ms,
    )  # fmt: skip


_INFER_BODY = request_body(
    **{"application/json": {"schema": {"$ref": f"#/components/schemas/{InferRequest.__name__}"}}}
)
_CAPTION_BODY = request_body(**{"multipart/form-data": form([CAPTION_FIELD], {CAPTION_FIELD: FILE_PART}, closed=True)})


@api.post(
    "/infer",
    response_model=InferResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=_INFER_BODY,
    summary="The original write-ups' question endpoint",
    description='JSON `{"image_url", "prompt"}`, as the original write-ups sent it: the prompt is answered as '
    "`/v1/analyze` answers a question in mode `auto`. `image_url` is a `data:image/...;base64,...` URL, or an "
    "http(s) URL where this deployment fetches them.",
)
async def infer(intake: IntakeDep) -> InferResponse:
    body = await intake.body(InferRequest)
    question = intake.question(body.prompt, "prompt")
    source = await intake.image_at(body.image_url)
    outcome = await intake.run(await intake.prepare(question, source.data, Options(), image_url=source.url))
    return infer_response(outcome, intake.request_id)


@api.post(
    "/caption",
    response_model=CaptionResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=_CAPTION_BODY,
    summary="The original write-ups' caption endpoint",
    description="Multipart with one `file` part (the image), as the original write-ups sent it: the vision stage's "
    "one-sentence caption.",
)
async def caption(intake: IntakeDep) -> CaptionResponse:
    data = await _read_upload(intake.request, intake.services.settings.limits.max_image_bytes)
    vision = await intake.caption(await intake.image(data))
    return caption_response(vision, intake.request_id)


async def _read_upload(request: Request, max_image_bytes: int) -> bytes:
    """The bytes of the form's one `file` part (at most `max_image_bytes + 1` of them: the decoder refuses more)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "multipart/form-data":
        raise UnsupportedMediaType(f"unsupported content type {content_type or '(none)'!r}: send multipart/form-data")
    form = await read_form(request, max_fields=1)
    try:
        unknown = sorted(set(form.keys()) - {CAPTION_FIELD})
        if unknown:
            raise ValidationFailed(f"unknown form fields: {', '.join(unknown)}; the only one is {CAPTION_FIELD!r}")
        upload = form.get(CAPTION_FIELD)
        if not isinstance(upload, UploadFile):
            raise ImageMissing(f"the form has no `{CAPTION_FIELD}` file part")
        return await upload.read(max_image_bytes + 1)
    finally:
        await form.close()
