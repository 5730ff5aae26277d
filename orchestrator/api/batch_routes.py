"""The OpenAI Batch API's endpoints, so that the official client's `files` and `batches` work unchanged
(`orchestrator.bulk` keeps the files and runs the batches).

Files and batches belong to their caller: the API key's id, or the client's address without keys. Another caller's
id answers `404 file_not_found` / `404 batch_not_found`, as an unknown one does. An upload is bounded by
`ORCH_LIMITS__MAX_REQUEST_BYTES` like every request.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from orchestrator.api.schemas import FILE_PART, ErrorResponse, form, request_body
from orchestrator.bulk.files import ENDPOINTS, new_batch
from orchestrator.bulk.runner import Batches
from orchestrator.errors import BatchInvalid, NotReady, ValidationFailed
from orchestrator.observability.record import RequestRecord

BATCH_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "A body that does not parse, or a file or batch the Batch API cannot take (`invalid_batch`)",
        401: "No valid API key, when keys are configured (`api_key_missing`, `api_key_invalid`)",
        404: "No such file or batch of this caller (`file_not_found`, `batch_not_found`)",
        413: "An upload over `ORCH_LIMITS__MAX_REQUEST_BYTES` (`request_too_large`)",
        415: "Not a body type this endpoint takes (`unsupported_media_type`)",
        422: "Missing, invalid or unknown fields (`validation_error`)",
        429: "Over the API key's rate or concurrency limit (`rate_limited`, `too_many_in_flight`); see Retry-After",
        503: "Not ready, or the shared store does not answer (`not_ready`, `batches_unavailable`); see Retry-After",
    }.items()
}
_UPLOAD = request_body(
    **{
        "multipart/form-data": form(
            ["file", "purpose"], {"file": FILE_PART, "purpose": {"type": "string", "enum": ["batch"]}}
        )
    }
)
api = APIRouter(tags=["batch"], responses=BATCH_ERRORS)
Identifier = Annotated[str, Path(max_length=64)]


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(max_length=64)
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


def owner_of(request: Request) -> str:
    """Who a file or batch belongs to: the API key's id, or the client's address without keys."""
    record = RequestRecord.of(request.scope)
    if record.key_id:
        return record.key_id
    return f"client:{record.client.rsplit(':', 1)[0] if record.client else '-'}"


def batches_of(request: Request) -> Batches:
    batches: Batches | None = getattr(request.app.state, "batches", None)
    if batches is None:
        raise NotReady("the batch runner is not started")
    return batches


@api.post(
    "/v1/files", summary="Upload a batch input file (OpenAI `files.create`, `purpose=batch`)", openapi_extra=_UPLOAD
)
async def create_file(request: Request) -> dict[str, Any]:
    form = await request.form()
    upload, purpose = form.get("file"), form.get("purpose")
    if not isinstance(upload, UploadFile):
        raise ValidationFailed("the form needs a `file` part (the JSONL of requests)")
    if purpose != "batch":
        raise BatchInvalid(f"`purpose` must be `batch`, not {purpose!r}: this service keeps batch files only")
    data = await upload.read()
    record = await batches_of(request).add_file(owner_of(request), upload.filename or "input.jsonl", "batch", data)
    return record.out()


@api.get("/v1/files/{file_id}", summary="A file's record (OpenAI `files.retrieve`)")
async def get_file(request: Request, file_id: Identifier) -> dict[str, Any]:
    return (await batches_of(request).file(file_id, owner_of(request))).out()


@api.get("/v1/files/{file_id}/content", summary="A file's bytes (OpenAI `files.content`)")
async def get_file_content(request: Request, file_id: Identifier) -> Response:
    batches = batches_of(request)
    record = await batches.file(file_id, owner_of(request))
    return Response(await batches.content(record), media_type="application/jsonl")


@api.post("/v1/batches", summary="Run a file of requests in the background (OpenAI `batches.create`)")
async def create_batch(request: Request, body: BatchCreate) -> dict[str, Any]:
    if body.endpoint not in ENDPOINTS:
        raise BatchInvalid(f"`endpoint` must be one of {', '.join(ENDPOINTS)}, not {body.endpoint!r}")
    if body.completion_window != "24h":
        raise BatchInvalid(f"`completion_window` must be `24h`, not {body.completion_window!r}")
    owner, batches = owner_of(request), batches_of(request)
    source = await batches.file(body.input_file_id, owner)
    if source.purpose != "batch":
        raise BatchInvalid(f"file {source.id!r} is a batch's output, not an input")
    record = new_batch(owner, body.endpoint, source.id, body.completion_window, body.metadata)
    return (await batches.submit(record)).out()


@api.get("/v1/batches/{batch_id}", summary="A batch, with its progress (OpenAI `batches.retrieve`)")
async def get_batch(request: Request, batch_id: Identifier) -> dict[str, Any]:
    return (await batches_of(request).batch(batch_id, owner_of(request))).out()


@api.get("/v1/batches", summary="The caller's batches, newest first (OpenAI `batches.list`)")
async def list_batches(
    request: Request, limit: Annotated[int, Query(ge=1, le=100)] = 20, after: str | None = None
) -> dict[str, Any]:
    records = await batches_of(request).batches(owner_of(request))
    if after is not None:
        ids = [record.id for record in records]
        records = records[ids.index(after) + 1 :] if after in ids else []
    page = records[:limit]
    return {
        "object": "list",
        "data": [record.out() for record in page],
        "first_id": page[0].id if page else None,
        "last_id": page[-1].id if page else None,
        "has_more": len(records) > limit,
    }


@api.post("/v1/batches/{batch_id}/cancel", summary="Stop a batch; what it answered is kept (OpenAI `batches.cancel`)")
async def cancel_batch(request: Request, batch_id: Identifier) -> dict[str, Any]:
    batches = batches_of(request)
    return (await batches.cancel(await batches.batch(batch_id, owner_of(request)))).out()
