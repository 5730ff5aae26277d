"""Request and response bodies of the public API, and their conversion from the pipeline's dataclasses."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from orchestrator.analysis.messages import Profile
from orchestrator.analysis.routing import Decision, RequestedMode
from orchestrator.arbitration.answer_json import ResponseFormat

EXAMPLE_IMAGE_BASE64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR42mP4DwABAQEAHLCMmQAAAABJRU5ErkJggg=="
"""A 1×1 white PNG, for the OpenAPI description's request examples."""
EXAMPLE_IMAGE_URL = f"data:image/png;base64,{EXAMPLE_IMAGE_BASE64}"


class AnalyzeJsonRequest(BaseModel):
    """The JSON form of `POST /v1/analyze`: exactly one of `image_base64`, `image_url` (a `data:` or http(s) URL) and
    `session_id` (a follow-up about an earlier request's image)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"question": "What is the total?", "image_base64": EXAMPLE_IMAGE_BASE64},
                {
                    "question": "Why is the total higher than the subtotal?",
                    "image_url": EXAMPLE_IMAGE_URL,
                    "stream": True,
                },
            ]
        },
    )

    question: str = Field(min_length=1, description="The question about the image.")
    image_base64: str | None = Field(default=None, description="The image file's bytes, base64-encoded.")
    image_url: str | None = Field(
        default=None,
        description="A `data:image/...;base64,...` URL, or an http(s) URL where this deployment fetches them "
        "(otherwise 400 `image_url_not_supported`).",
    )
    session_id: str | None = Field(
        default=None,
        max_length=64,
        description="A follow-up question about the image of an earlier answer (its `session_id`), sent instead of "
        "the image: the kept image, and its description on the reasoning route, are reused.",
    )
    mode: RequestedMode = Field(default="auto", description="`auto` lets the router decide; the others force it.")
    profile: Profile = "general"
    response_format: ResponseFormat = Field(
        default="text",
        description="`json`: the answer as a JSON object of fields read from the image, each checked against it; "
        "always takes the reasoning route.",
    )
    stream: bool = Field(
        default=False,
        description="Answer as server-sent events: `route`, `vision`, `reasoning`, `arbitration`, `done`.",
    )


class _Read(BaseModel):
    """Read from the pipeline's dataclass of the same fields (`model_validate(result)`)."""

    model_config = ConfigDict(from_attributes=True)


class RouteOut(BaseModel):
    decision: Decision
    score: float = Field(description="Evidence for reasoning, 0 to 1.")
    reason: str
    forced: bool = Field(description="True when the client's `mode` decided, not the router.")


class TextLineOut(_Read):
    text: str
    box: list[tuple[float, float]] = Field(description="Four corners in pixels, clockwise from top-left.")
    score: float = Field(description="Recognition confidence, 0 to 1.")
    order: int = Field(description="Reading order, 0 first.")
    relevance: float | None = Field(description="Similarity to the question, when one was asked.")


class TagOut(_Read):
    label: str
    score: float


class ColorOut(_Read):
    name: str
    hex: str
    fraction: float


class FactsOut(_Read):
    width: int
    height: int
    orientation: Literal["landscape", "portrait", "square"]
    format: str
    dominant_colors: list[ColorOut]


class BoxOut(_Read):
    """A box on the 0–1000 scale relative to the image (x right, y down), as GLM-4.6V grounds."""

    x0: float
    y0: float
    x1: float
    y1: float


class ObjectOut(_Read):
    label: str
    box: BoxOut | None


class FieldOut(_Read):
    key: str
    value: str


class StructuredOut(_Read):
    facts: FactsOut
    text_lines: list[TextLineOut] = Field(description="Most relevant to the question first; see `order`.")
    tags: list[TagOut] = Field(description="ImageNet tags (the `ocr` backend).")
    languages: list[str]
    objects: list[ObjectOut] = Field(description="Objects the vision model named or located (GLM).")
    fields: list[FieldOut] = Field(description="Labelled values read from the image (GLM), e.g. a total.")
    layout: str | None


class VisionOut(_Read):
    backend: str
    model: str
    caption: str
    description: str = Field(description="The readable description the reasoning stage reads.")
    structured: StructuredOut
    answer: str | None
    thinking: str | None = Field(description="The vision model's reasoning trace, when thinking was on.")
    boxes: list[BoxOut] = Field(description="Grounding boxes in the vision model's answer, in order.")
    notes: list[str]
    latency_ms: float
    cached: bool = Field(description="True when the orchestrator's cache answered for the vision stage.")


class ReasoningOut(_Read):
    backend: str
    model: str
    answer: str = Field(validation_alias=AliasChoices("text", "answer"))
    thinking: str | None = Field(description="The LLM's reasoning trace, when it produced one.")
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float


class EvidenceOut(_Read):
    source: str
    text: str
    where: str = Field(description="Where in the vision result, e.g. `line 8`, `field “Total”`, `witness line 5`.")
    boxes: list[list[tuple[float, float]]] = Field(
        default_factory=list,
        description="The boxes of the text lines this was read from, four corners each in the image's pixels "
        "(as `text_lines[].box`); empty for fields, sentences and tags.",
    )


class CheckOut(BaseModel):
    kind: Literal["number", "date", "time", "quote", "object", "count"]
    claim: str = Field(description="The claim as the answer put it.")
    value: str
    referent: str = Field(description="What the claim is about, e.g. `total`.")
    verdict: Literal["supported", "contradicted", "unverifiable"]
    reason: str
    evidence: EvidenceOut | None
    witness: EvidenceOut | None = Field(
        default=None,
        description="The OCR witness's reading (source `witness`) when it read otherwise what `evidence`, the vision "
        "stage's reading, shows: the claim is then contradicted. Null otherwise.",
    )


class ArbitrationOut(BaseModel):
    status: Literal["agreed", "corrected", "needs_review", "skipped"]
    reason: str
    corrected: bool = Field(description="True when the reasoning stage was re-asked and its second answer returned.")
    checks: list[CheckOut] = Field(description="Each concrete claim of the answer, checked against the image.")


class StageUsageOut(_Read):
    calls: int = Field(description="Model generations of this stage the request caused (cache hits excluded).")
    prompt_tokens: int
    completion_tokens: int


class UsageOut(BaseModel):
    """Every generation the request caused, in both stages: the vision stage's description or answer (and the
    answer standing in for a failed reasoning stage, and the arbiter's probes), the reasoning stage's first answer
    and a re-asked one. Tokens are 0 where a backend does not count them (`ocr`)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    vision: StageUsageOut
    reasoning: StageUsageOut


class FailureOut(BaseModel):
    stage: str
    backend: str
    error_type: str
    message: str


class OutcomeOut(BaseModel):
    """What every rendering of an analysis's outcome holds: `AnalyzeResponse`, and the chat completion's
    `orchestration`."""

    request_id: str
    answer: str
    answer_fields: dict[str, Any] | None = Field(
        description="With `response_format: json`, the answer's parsed fields; null for text answers or unparseable "
        "JSON."
    )
    mode: Decision = Field(description="What actually ran.")
    route: RouteOut
    arbitration: ArbitrationOut
    confidence: float = Field(
        description="0–1: 0.3 × evidence quality + 0.5 × claim verification + 0.2 × routing certainty (docs/api.md)."
    )
    degraded: bool = Field(description="True when a stage the route wanted failed and a fallback answered.")
    notices: list[str]
    disclaimer: str | None
    needs_human_review: bool
    language: Literal["zh", "en"]
    failures: list[FailureOut]
    timings_ms: dict[str, float]


class AnalyzeResponse(OutcomeOut):
    session_id: str | None = Field(
        description="Send it instead of the image to ask about the same image again (`/v1/analyze`; null elsewhere)."
    )
    vision: VisionOut
    reasoning: ReasoningOut | None = Field(description="Null when the route skipped it or it failed.")
    usage: UsageOut


class ErrorBody(BaseModel):
    type: str
    message: str
    request_id: str


class ErrorResponse(BaseModel):
    error: ErrorBody


ERROR_STATUSES: dict[int, str] = {
    400: "Malformed request or image (`image_missing`, `invalid_base64`, `invalid_data_url`, `invalid_json`, "
    "`invalid_multipart`, `image_empty`, `image_corrupt`), or an image URL that is not fetched or could not be "
    "(`image_url_not_supported`, `image_url_invalid`, `image_url_unreachable`, `image_url_timeout`, "
    "`image_url_too_many_redirects`, `image_url_bad_status`)",
    401: "No valid API key, when keys are configured (`api_key_missing`, `api_key_invalid`)",
    403: "An image URL whose host is private, loopback or a metadata address (`image_url_forbidden`)",
    413: "Too large (`request_too_large`, `image_too_large`, `image_too_many_pixels`)",
    415: "Not an accepted image or body type (`image_unsupported`, `image_url_not_image`, `unsupported_media_type`)",
    422: "Missing, invalid or unknown fields (`validation_error`)",
    429: "Over the API key's (or, when enabled, the client address's) rate or concurrency limit (`rate_limited`, "
    "`too_many_in_flight`); see Retry-After",
    502: "The vision stage answered something unusable (`vision_invalid_output`, `vision_rejected`)",
    503: "Not ready, or the vision stage is unavailable (`not_ready`, `vision_unavailable`, `overloaded`); see "
    "Retry-After",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description} for status, description in ERROR_STATUSES.items()
}
"""The error responses of every endpoint that reads an image, for the OpenAPI description."""


class ReasoningDeltaOut(BaseModel):
    """The `reasoning` event of a streamed analysis."""

    text: str = Field(description="The next piece of the reasoning stage's answer, as the LLM produces it.")
    thinking: str = Field(description="The next piece of the LLM's thinking, when it thinks aloud.")


class ArbitrationEventOut(ArbitrationOut):
    """The `arbitration` event of a streamed analysis."""

    answer: str = Field(description="The answer returned: the streamed one, or the re-asked one.")
    replaced: bool = Field(description="True when `answer` replaces the streamed text (a re-asked answer).")


class StreamErrorOut(BaseModel):
    """The `error` event of a streamed analysis (and, without `failure`, the in-band error of a chat stream)."""

    error: ErrorBody
    failure: FailureOut | None = Field(
        description="The stage that failed mid-answer; a `done` event with the fallback answer follows. Null when "
        "the request itself failed: then this is the last event."
    )


class AnalyzeStreamDone(AnalyzeResponse):
    """The `done` event of a streamed analysis: the `/v1/analyze` response, and whether the streamed text stands."""

    replaced: bool = Field(
        description="True when `answer` is not the text the `reasoning` events streamed: a re-asked answer after a "
        "contradiction, or the vision stage's answer after the reasoning stage failed mid-answer."
    )


def request_body(**content: dict[str, Any]) -> dict[str, Any]:
    """An endpoint's `openapi_extra` for a body its handler reads by hand: `content` by media type."""
    return {"requestBody": {"required": True, "content": content}}


def form(required: list[str], properties: dict[str, Any], *, closed: bool = False) -> dict[str, Any]:
    """A `multipart/form-data` body's description: its fields, those `required`, and (`closed`) no others."""
    schema: dict[str, Any] = {"type": "object", "required": required, "properties": properties}
    if closed:
        schema["additionalProperties"] = False
    return {"schema": schema}


FILE_PART: dict[str, str] = {"type": "string", "format": "binary"}
