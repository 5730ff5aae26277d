"""Scripted fake backends for pipeline and API tests: they satisfy the real protocols, and record their calls."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import ClassVar, Generic, TypeVar

import numpy as np

from orchestrator.analysis.routing import Vector
from reasoning_stage.backend import Health as ReasoningHealth
from reasoning_stage.errors import ReasoningError, ReasoningUnavailable
from reasoning_stage.types import ReasoningDelta, ReasoningRequest, ReasoningResult
from stage_protocol.backend import FinishReason
from vision_stage.backend import Health as VisionHealth
from vision_stage.errors import VisionError, VisionUnavailable
from vision_stage.types import DecodedImage, ImageFacts, StructuredDescription, TextLine, VisionRequest, VisionResult

RECEIPT_LINES = ("BLUE BOTTLE CAFE", "Latte 2 x 18.00 36.00", "TOTAL 54.06")

RequestT = TypeVar("RequestT")


def text_line(text: str, order: int) -> TextLine:
    top = 40.0 + 50.0 * order
    return TextLine(text, ((40.0, top), (300.0, top), (300.0, top + 30.0), (40.0, top + 30.0)), 0.99, order)


@dataclass
class FakeStage(Generic[RequestT]):
    """What both fake stages share: they record every request, and once closed they refuse work with `unavailable`
    and report themselves unhealthy."""

    unavailable: ClassVar[type[Exception]]
    name: str = "fake"
    requests: list[RequestT] = field(default_factory=list)
    closed: bool = False

    def _record(self, request: RequestT) -> None:
        self.requests.append(request)
        if self.closed:
            raise self.unavailable(f"the {type(self).__name__} backend is closed")

    def _health_detail(self) -> str:
        return "closed" if self.closed else "fake"

    async def aclose(self) -> None:
        self.closed = True


@dataclass
class FakeVision(FakeStage[VisionRequest]):
    """Reads `lines` from any image; answers with the last line; or raises `error`. With `replies`, an `answer` task
    is answered with `replies(question)` instead (which may raise a `VisionError`), as a probe would be."""

    lines: tuple[str, ...] = RECEIPT_LINES
    error: VisionError | None = None
    replies: Callable[[str], str] | None = None
    healthy: bool = True
    model: str = "fake-vision"
    unavailable = VisionUnavailable

    async def generate(self, request: VisionRequest) -> VisionResult:
        self._record(request)
        if self.error is not None:
            raise self.error
        image = request.image
        facts = ImageFacts(image.width, image.height, "portrait", image.format, ())
        lines = tuple(text_line(text, order) for order, text in enumerate(self.lines))
        return VisionResult(
            backend=self.name,
            model=self.model,
            task=request.task,
            caption=f"An image with {len(lines)} lines of text.",
            description="\n".join(f"“{line}”" for line in self.lines),
            structured=StructuredDescription(facts, lines, (), ("en",)),
            answer=self._answer(request.question or "") if request.task == "answer" else None,
            latency_ms=1.0,
        )

    def _answer(self, question: str) -> str:
        if self.replies is not None:
            return self.replies(question)
        if not self.lines:
            return "No text was read in the image."
        return f"Text in the image most relevant to the question: “{self.lines[-1]}”."

    async def health(self) -> VisionHealth:
        return VisionHealth(self.healthy and not self.closed, self._health_detail())


@dataclass
class FakeWitness:
    """The arbiter's second witness (`orchestrator.arbitration.witness.Witness`): reads `lines` from any image, after
    `delay_s`; or raises `error`. Records each read, and whether a read was
    cancelled; `started` is set when a read begins."""

    lines: tuple[str, ...] = ("BLUE LOTUS CAFE", "Date: 2026-03-14", "TOTAL 80.00")
    error: VisionError | None = None
    delay_s: float = 0.0
    name: str = "fake-ocr"
    reads: list[DecodedImage] = field(default_factory=list)
    cancelled: int = 0
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self, image: DecodedImage, /) -> tuple[TextLine, ...]:
        self.reads.append(image)
        self.started.set()
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.error is not None:
            raise self.error
        return tuple(text_line(text, order) for order, text in enumerate(self.lines))

    async def aclose(self) -> None:
        pass


@dataclass
class FakeReasoning(FakeStage[ReasoningRequest]):
    """Answers `answer`, or raises `error`; with `script`, the n-th call gets the n-th entry (an answer or an error),
    and calls past its end get `answer`."""

    answer: str = "The total is 54.06."
    finish_reason: FinishReason = "stop"
    error: ReasoningError | None = None
    script: tuple[str | ReasoningError, ...] = ()
    model: str = "fake-llm"
    unavailable = ReasoningUnavailable

    async def generate(self, request: ReasoningRequest) -> ReasoningResult:
        self._record(request)
        scripted = self.script[len(self.requests) - 1] if len(self.requests) <= len(self.script) else None
        error = scripted if isinstance(scripted, ReasoningError) else self.error
        if error is not None:
            raise error
        text = scripted if isinstance(scripted, str) else self.answer
        prompt_tokens = sum(len(message.content.split()) for message in request.messages)
        return ReasoningResult(self.name, self.model, text, prompt_tokens, len(text.split()), self.finish_reason, 2.0)

    async def health(self) -> ReasoningHealth:
        return ReasoningHealth(not self.closed, self._health_detail())


@dataclass
class FakeStreamingReasoning(FakeReasoning):
    """A `FakeReasoning` that also streams (a `StreamingReasoningBackend`): `thinking` first when set, then its
    answer word by word, then the finish. An error the script or `error` gives raises before the first delta; with
    `fail_after`, `stream_error` raises after that many words. With `gate`, the stream waits after its first word
    until the gate is set (from any thread). `abandoned` counts streams closed before their end."""

    thinking: str = ""
    fail_after: int | None = None
    stream_error: ReasoningError = field(default_factory=lambda: ReasoningUnavailable("the fake stream broke"))
    gate: threading.Event | None = None
    abandoned: int = 0

    async def stream(self, request: ReasoningRequest) -> AsyncGenerator[ReasoningDelta, None]:
        result = await self.generate(request)  # records the request; scripted errors raise here
        try:
            if self.thinking:
                yield ReasoningDelta(thinking=self.thinking)
            for index, word in enumerate(result.text.split(" ")):
                if index == self.fail_after:
                    raise self.stream_error
                yield ReasoningDelta(text=word if index == 0 else f" {word}")
                if index == 0 and self.gate is not None:
                    await asyncio.to_thread(self.gate.wait, 30)
        except GeneratorExit:
            self.abandoned += 1
            raise
        yield ReasoningDelta(
            finish_reason=result.finish_reason,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
        )


@dataclass
class Clock:
    """A clock that stands still until a test moves `now` (seconds)."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeEmbedder:
    """Embeds each text as its hand-made vector in `vectors` (L2-normalised), or as `default`; records every call."""

    vectors: dict[str, tuple[float, ...]]
    default: tuple[float, ...] = (0.0, 0.0, 1.0)
    calls: list[str | list[str]] = field(default_factory=list)

    def query(self, texts: str | list[str], /) -> Vector:
        self.calls.append(texts)
        if isinstance(texts, str):
            return self._unit(texts)
        return np.stack([self._unit(text) for text in texts])

    def _unit(self, text: str) -> Vector:
        vector = np.asarray(self.vectors.get(text, self.default), dtype=np.float32)
        unit: Vector = vector / np.linalg.norm(vector)
        return unit
