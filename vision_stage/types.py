"""What goes into and comes out of the vision stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from PIL import Image

VisionTask = Literal["caption", "describe", "answer"]
"""`caption`: one readable sentence; `describe`: the structured description a reasoning stage reads;
`answer`: the description plus a direct answer to the question."""

Orientation = Literal["landscape", "portrait", "square"]
Point = tuple[float, float]


@dataclass(frozen=True)
class DecodedImage:
    """A validated image: the decoded RGB pixels plus facts about the bytes it came from."""

    pixels: Image.Image
    format: str
    width: int
    height: int
    byte_size: int
    sha256: str


@dataclass(frozen=True)
class VisionRequest:
    image: DecodedImage
    question: str | None = None
    task: VisionTask = "describe"


@dataclass(frozen=True)
class TextLine:
    """One line of text read from the image.

    `order` is the reading order (0 = first line, top to bottom, left to right); `box` is the quadrilateral around
    the line in pixels, clockwise from top-left; `relevance` is the similarity to the question when one was asked.
    """

    text: str
    box: tuple[Point, Point, Point, Point]
    score: float
    order: int
    relevance: float | None = None


@dataclass(frozen=True)
class Tag:
    """A label for what the image may show, with the classifier's probability."""

    label: str
    score: float


@dataclass(frozen=True)
class ColorShare:
    name: str
    hex: str
    fraction: float


@dataclass(frozen=True)
class ImageFacts:
    width: int
    height: int
    orientation: Orientation
    format: str
    dominant_colors: tuple[ColorShare, ...]


@dataclass(frozen=True)
class StructuredDescription:
    """What the vision stage saw, as data.

    `text_lines` are in reading order, or, when a question was asked, most relevant to the question first.
    """

    facts: ImageFacts
    text_lines: tuple[TextLine, ...] = ()
    tags: tuple[Tag, ...] = ()
    languages: tuple[str, ...] = ()


@dataclass(frozen=True)
class VisionResult:
    """The vision stage's answer.

    `description` is the readable text a reasoning stage reads; `structured` holds the same evidence as data;
    `answer` is set for the `answer` task.
    """

    backend: str
    model: str
    task: VisionTask
    caption: str
    description: str
    structured: StructuredDescription
    answer: str | None = None
    latency_ms: float = 0.0
    notes: tuple[str, ...] = field(default=())
