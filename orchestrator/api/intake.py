"""What every endpoint that analyses an image does with a request before the pipeline: check the question, decode the
image (routing the question meanwhile), and know the request's id and the output filter its answer leaves through."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing

from fastapi import Request

from orchestrator.analysis.routing import RequestedMode
from orchestrator.analysis.sessions import Session, SessionStore
from orchestrator.analysis.types import PipelineEvent, Routed, VisionEvent
from orchestrator.api.deps import Services
from orchestrator.arbitration.answer_json import ResponseFormat
from orchestrator.errors import ValidationFailed
from orchestrator.security.output_filter import OutputFilter
from orchestrator.settings import LimitSettings
from vision_stage.images import ImageLimits, declared_pixels, decode_image
from vision_stage.types import DecodedImage


def checked_question(text: str, limits: LimitSettings, name: str = "question") -> str:
    """`text` stripped; a blank, overlong or not Unicode (JSON's lone `\\ud800` escapes) question is a
    `ValidationFailed` naming the field `name`."""
    question = checked_text(text, name).strip()
    if not question:
        raise ValidationFailed(f"{name}: the question must not be blank")
    if len(question) > limits.max_question_chars:
        raise ValidationFailed(f"{name}: {len(question)} characters; the limit is {limits.max_question_chars}")
    return question


def checked_text(text: str, name: str) -> str:
    """`text`, unless it holds a lone surrogate (JSON can escape one; no UTF-8 can carry it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValidationFailed(f"{name}: not valid Unicode text (a lone surrogate at {exc.start})") from None
    return text


INLINE_DECODE_MAX_BYTES = 64 * 1024
INLINE_DECODE_MAX_PIXELS = 256 * 256
"""An upload of at most this many bytes that declares at most this many pixels decodes on the event loop (well under
a millisecond): a hop to a thread costs more. Bytes alone are no bound: a few kilobytes of PNG can declare 40
megapixels."""


async def decode(services: Services, data: bytes) -> DecodedImage:
    """The image, validated and decoded under the configured limits: a small one on the event loop, any other off
    it."""
    limits = services.settings.limits
    image_limits = ImageLimits(max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels)
    if decodes_inline(data):
        return decode_image(data, image_limits)
    return await asyncio.to_thread(decode_image, data, image_limits)


def decodes_inline(data: bytes) -> bool:
    """Whether `decode` decodes `data` on the event loop (see `INLINE_DECODE_MAX_BYTES`)."""
    if len(data) > INLINE_DECODE_MAX_BYTES:
        return False
    pixels = declared_pixels(data)
    return pixels is None or pixels <= INLINE_DECODE_MAX_PIXELS


async def decode_and_route(
    services: Services, data: bytes, question: str, mode: RequestedMode, response_format: ResponseFormat
) -> tuple[DecodedImage, Routed]:
    # Route while the image decodes: routing then adds only what outlasts the decoding. The routing task starts
    # first (the yield), so that a decoding on the event loop does not hold it back.
    routing = asyncio.create_task(services.pipeline.route(question, mode, response_format))
    try:
        await asyncio.sleep(0)
        image = await decode(services, data)
    finally:
        routed = await routing  # never cancelled mid-query: a bad image waits for at most one routing call
    return image, routed


def request_id(request: Request) -> str:
    return str(request.scope["state"]["request_id"])


def session_owner(request: Request) -> str:
    """Who a session belongs to: the API key's id, or the client's address when no keys are configured."""
    state = request.scope.get("state", {})
    if state.get("key_id"):
        return f"key:{state['key_id']}"
    return f"client:{request.client.host if request.client else '-'}"


async def remembered(
    sessions: SessionStore, session: Session, events: AsyncGenerator[PipelineEvent, None]
) -> AsyncGenerator[PipelineEvent, None]:
    """`events`, keeping the vision stage's description in `session` as it passes."""
    async with aclosing(events):
        async for event in events:
            if isinstance(event, VisionEvent):
                sessions.remember(session, event.vision)
            yield event


def output_filter(services: Services) -> OutputFilter:
    """The filter every answer of this service leaves through (`orchestrator.security.output_filter`)."""
    return OutputFilter.from_settings(services.settings.output_filter)
