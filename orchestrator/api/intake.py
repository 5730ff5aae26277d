"""One intake for every endpoint that analyses an image: prepare → run or stream → render.

An endpoint reads its own body (`orchestrator.api.inputs`) and renders its own answer; in between, `Intake` does what
they all share: `prepare` checks the question, decodes the image while the question is routed, and opens or finds
the request's session; `run` and `stream` run the pipeline, keep the description in the session, record the
analysis on the request's record (`orchestrator.observability.record`), and pass the answer through the output
filter (`orchestrator.security.output_filter`), built once per app.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel

from orchestrator.analysis.routing import RequestedMode
from orchestrator.analysis.sessions import Session
from orchestrator.analysis.types import (
    AnalyzeInput,
    AnalyzeOutcome,
    DoneEvent,
    Options,
    PipelineEvent,
    Routed,
    VisionEvent,
)
from orchestrator.api.deps import Services, get_services
from orchestrator.api.events import started
from orchestrator.api.inputs import ImageInput, read_image_url, read_json_request
from orchestrator.arbitration.answer_json import ResponseFormat
from orchestrator.errors import SessionsUnavailable, ValidationFailed
from orchestrator.observability.record import RequestRecord
from orchestrator.security.output_filter import filtered_events
from orchestrator.settings import LimitSettings
from vision_stage.images import ImageLimits, declared_pixels, decode_image
from vision_stage.types import DecodedImage, VisionResult

M = TypeVar("M", bound=BaseModel)

log = logging.getLogger(__name__)


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
    if mode != "auto" or response_format == "json":  # the client chose the route: no router's work to overlap
        routed = await services.pipeline.route(question, mode, response_format)
        return await decode(services, data), routed
    # Route while the image decodes: routing then adds only what outlasts the decoding. The routing task starts
    # first (the yield), so that a decoding on the event loop does not hold it back.
    routing = asyncio.create_task(services.pipeline.route(question, mode, response_format))
    try:
        await asyncio.sleep(0)
        image = await decode(services, data)
    finally:
        routed = await routing  # never cancelled mid-query: a bad image waits for at most one routing call
    return image, routed


@dataclass(frozen=True)
class Prepared:
    """An analysis ready to run: its input, its route, and (`/v1/analyze`) its session."""

    analysis: AnalyzeInput
    routed: Routed
    session: Session | None = None


class Intake:
    """One request's way from its read body to the answer it renders."""

    def __init__(self, request: Request, services: Services) -> None:
        self.request = request
        self.services = services
        self.record = RequestRecord.of(request.scope)

    @property
    def request_id(self) -> str:
        return self.record.request_id

    def question(self, text: str, name: str = "question") -> str:
        """`checked_question` under the configured limits."""
        return checked_question(text, self.services.settings.limits, name)

    async def body(self, model: type[M]) -> M:
        """The request's JSON body as `model` (`read_json_request`)."""
        return await read_json_request(self.request, model)

    async def image_at(self, url: str) -> ImageInput:
        """The image a `data:` or http(s) URL gives, under the configured limit (`read_image_url`)."""
        return await read_image_url(self.request, url, self.services.settings.limits.max_image_bytes)

    async def image(self, data: bytes) -> DecodedImage:
        """`data` decoded under the configured limits (`decode`)."""
        return await decode(self.services, data)

    async def prepare(
        self, question: str, image: bytes, options: Options, *, image_url: str | None = None, session: bool = False
    ) -> Prepared:
        """The image decoded while `question` (checked already) is routed; with `session`, a new session for it."""
        decoded, routed = await decode_and_route(self.services, image, question, options.mode, options.response_format)
        opened = await self._open_session(decoded, image_url) if session else None
        return Prepared(self._input(decoded, question, options, image_url), routed, opened)

    async def _open_session(self, image: DecodedImage, image_url: str | None) -> Session | None:
        """A session for the image; None when the shared session store fails: the answer comes without a
        `session_id` rather than not at all."""
        try:
            return await self.services.sessions.open(self.session_owner, image, image_url)
        except SessionsUnavailable as exc:
            log.warning("answering without a session: %s", exc)
            return None

    async def resume(self, session_id: str, question: str, options: Options) -> Prepared:
        """A question about the image of the caller's session `session_id` (404 `session_not_found` without one)."""
        session = await self.services.sessions.get(session_id, self.session_owner)
        routed = await self.services.pipeline.route(question, options.mode, options.response_format)
        analysis = self._input(session.image, question, options, session.image_url, session.description)
        return Prepared(analysis, routed, session)

    async def run(self, prepared: Prepared) -> AnalyzeOutcome:
        """The whole answer, recorded, filtered."""
        outcome = await self.services.pipeline.run(prepared.analysis, prepared.routed)
        await self._finished(prepared, outcome)
        return self.services.answers.outcome(outcome)

    async def stream(self, prepared: Prepared) -> AsyncGenerator[PipelineEvent, None]:
        """The analysis's events, filtered, started (`orchestrator.api.events.started`): what fails before the vision
        stage has answered raises here; the outcome is recorded as its `DoneEvent` passes."""
        events = self._watched(prepared, self.services.pipeline.stream(prepared.analysis, prepared.routed))
        return filtered_events(await started(events), self.services.answers)

    async def caption(self, image: DecodedImage) -> VisionResult:
        """The vision stage's caption of `image`, recorded, filtered."""
        vision = await self.services.pipeline.caption(image)
        self.record.captioned(image, vision)
        return self.services.answers.vision(vision)

    @property
    def session_owner(self) -> str:
        """Who a session belongs to: the API key's id, or the client's address when no keys are configured."""
        if self.record.key_id:
            return f"key:{self.record.key_id}"
        return f"client:{self.record.client.rsplit(':', 1)[0] if self.record.client else '-'}"

    def _input(
        self,
        image: DecodedImage,
        question: str,
        options: Options,
        image_url: str | None,
        description: VisionResult | None = None,
    ) -> AnalyzeInput:
        return AnalyzeInput(image, question, image_url=image_url, description=description, **options.given())

    async def _finished(self, prepared: Prepared, outcome: AnalyzeOutcome) -> None:
        if prepared.session is not None:
            await self.services.sessions.remember(prepared.session, outcome.vision)
        self.record.analysed(prepared.analysis, outcome)

    async def _watched(
        self, prepared: Prepared, events: AsyncGenerator[PipelineEvent, None]
    ) -> AsyncGenerator[PipelineEvent, None]:
        """`events`, keeping the description in the session and recording the outcome as they pass."""
        async with aclosing(events):
            async for event in events:
                if isinstance(event, VisionEvent) and prepared.session is not None:
                    await self.services.sessions.remember(prepared.session, event.vision)
                elif isinstance(event, DoneEvent):
                    self.record.analysed(prepared.analysis, event.outcome)
                yield event


async def get_intake(request: Request) -> Intake:
    """The request's `Intake` (the services looked up here, not through a second dependency: FastAPI resolves each
    level of dependencies per request)."""
    return Intake(request, await get_services(request))


IntakeDep = Annotated[Intake, Depends(get_intake)]
"""What an analysing handler depends on: its request's `Intake`."""
