"""What goes into and comes out of the vision stage."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import InitVar, dataclass, field
from typing import TYPE_CHECKING, Literal

from vision_stage.errors import ImageRejected

if TYPE_CHECKING:
    from PIL import Image

VisionTask = Literal["caption", "describe", "answer"]
"""`caption`: one readable sentence; `describe`: the structured description a reasoning stage reads;
`answer`: the description plus a direct answer to the question."""

Orientation = Literal["landscape", "portrait", "square"]
Point = tuple[float, float]


class _Pixels:
    """An image's pixels: given, or decoded by a callable on first use (once, under a lock, then kept). A decoding
    failure (`ImageRejected`) is kept too, and raised anew on every later use without decoding again."""

    __slots__ = ("_decode", "_failure", "_lock", "image")

    def __init__(self, raster: Image.Image | Callable[[], Image.Image]) -> None:
        self._decode = raster if callable(raster) else None
        self.image: Image.Image | None = None if callable(raster) else raster
        self._failure: ImageRejected | None = None
        self._lock = threading.Lock()

    def get(self) -> Image.Image:
        if self.image is None:
            with self._lock:
                if self.image is None and self._failure is None and self._decode is not None:
                    try:
                        self.image = self._decode()
                    except ImageRejected as exc:
                        self._failure = exc
        if self._failure is not None:
            raise type(self._failure)(*self._failure.args) from None
        assert self.image is not None
        return self.image

    def __repr__(self) -> str:
        return f"<pixels_decoded={self.image is not None}>"

    def __reduce__(self) -> tuple[type[_Pixels], tuple[Image.Image]]:
        return (_Pixels, (self.get(),))


@dataclass(frozen=True)
class DecodedImage:
    """A validated image: its RGB pixels plus facts about the bytes it came from.

    What `vision_stage.images.decode_image` checks before it returns one, for every image: the byte count, the
    format, the declared size against the pixel limit (decompression bombs too); `sha256` is computed then too.
    The pixels are decoded then as well — EXIF orientation applied; palette, alpha, CMYK, greyscale and 16-bit
    normalised to 8-bit RGB — except for one kind of upload: an RGB PNG with no orientation to apply (its `source` is
    set) whose structure checks out whole (every chunk's length and CRC, up to IEND; one that does not is decoded at
    once, like any other image): nothing of it is inflated, and its pixels are decoded on first access to `pixels`
    (once, under a lock, then kept). A damaged compressed stream behind valid checksums surfaces only then, as
    `ImageCorrupt` (an `ImageRejected`, a 4xx wherever it is raised), on that and every later access.
    `pixels_decoded` says whether the pixels exist yet.

    `source` is the uploaded bytes when they hold exactly `pixels` (no orientation to apply, no colour conversion)
    in a format every OpenAI-compatible server reads (PNG, JPEG): a remote backend forwards them as they are instead
    of encoding the pixels again. None otherwise.

    `DecodedImage(raster, format, width, height, byte_size, sha256, source=None)`: `raster` is the decoded pixels, or
    a callable that decodes them when they are first needed. Two images are equal when their bytes' facts are
    (format, size, SHA-256); their pixels are never compared.
    """

    raster: InitVar[Image.Image | Callable[[], Image.Image]]
    format: str
    width: int
    height: int
    byte_size: int
    sha256: str
    source: bytes | None = field(default=None, compare=False, repr=False)
    _pixels: _Pixels = field(init=False, compare=False)

    def __post_init__(self, raster: Image.Image | Callable[[], Image.Image]) -> None:
        object.__setattr__(self, "_pixels", _Pixels(raster))

    @property
    def pixels(self) -> Image.Image:
        """The RGB pixels, decoded now when they were not yet (see the class); `ImageRejected` when they do not."""
        return self._pixels.get()

    @property
    def pixels_decoded(self) -> bool:
        """Whether the pixels have been decoded (always, but for the lazily decoded PNG of the class's docstring)."""
        return self._pixels.image is not None

    def __deepcopy__(self, memo: dict[int, object]) -> DecodedImage:
        return self  # immutable, and its pixels are never changed in place: copying would only decode them


@dataclass(frozen=True)
class VisionRequest:
    """`image_url` is where the client said the image lives (http(s)), when it did: a remote backend configured to
    pass URLs through sends it instead of the bytes. `profile` is the domain the question comes from (`general`,
    `medical`, …), when the caller knows it: the orchestrator's cache bypasses some."""

    image: DecodedImage
    question: str | None = None
    task: VisionTask = "describe"
    image_url: str | None = None
    profile: str | None = None


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


def text_rows(lines: Sequence[TextLine]) -> list[list[TextLine]]:
    """`lines` in reading order, grouped into rows: a line joins the row before it when the vertical centres of their
    boxes lie within half the smaller box's height ("TOTAL" and "165.28" read as two boxes are one row)."""
    rows: list[list[TextLine]] = []
    for line in sorted(lines, key=lambda line: line.order):
        if rows and _same_row(rows[-1][-1], line):
            rows[-1].append(line)
        else:
            rows.append([line])
    return rows


def _same_row(left: TextLine, right: TextLine) -> bool:
    def centre_and_height(line: TextLine) -> tuple[float, float]:
        ys = [y for _, y in line.box]
        return (max(ys) + min(ys)) / 2, max(ys) - min(ys)

    (c1, h1), (c2, h2) = centre_and_height(left), centre_and_height(right)
    return abs(c1 - c2) <= 0.5 * min(h1, h2)


@dataclass(frozen=True)
class Tag:
    """A label for what the image may show, with the classifier's probability."""

    label: str
    score: float


@dataclass(frozen=True)
class ColorShare:
    """One of the image's dominant colours: its nearest named colour, its hex value, and its share of the pixels."""

    name: str
    hex: str
    fraction: float


@dataclass(frozen=True)
class ImageFacts:
    """What is known of the image without looking: its size in pixels, orientation, file format and colours."""

    width: int
    height: int
    orientation: Orientation
    format: str
    dominant_colors: tuple[ColorShare, ...]


@dataclass(frozen=True)
class Box:
    """An axis-aligned box on the 0–1000 scale GLM-4.6V grounds with (x to the right, y down, relative to the image).

    `pixels(width, height)` gives the same box in pixels of an image of that size.
    """

    x0: float
    y0: float
    x1: float
    y1: float

    def pixels(self, width: int, height: int) -> tuple[float, float, float, float]:
        return (self.x0 * width / 1000, self.y0 * height / 1000, self.x1 * width / 1000, self.y1 * height / 1000)


@dataclass(frozen=True)
class DetectedObject:
    """Something the vision model located or named; `box` is None when it gave no location."""

    label: str
    box: Box | None = None


@dataclass(frozen=True)
class KeyValue:
    """A labelled value read from the image, e.g. `Total` → `54.06` on a receipt."""

    key: str
    value: str


@dataclass(frozen=True)
class StructuredDescription:
    """What the vision stage saw, as data.

    `text_lines` are in reading order, or, when a question was asked, most relevant to the question first.
    `objects`, `fields` and `layout` come from backends that produce them (GLM's structured description); the
    embedded `ocr` backend leaves them empty and gives `tags` instead.
    """

    facts: ImageFacts
    text_lines: tuple[TextLine, ...] = ()
    tags: tuple[Tag, ...] = ()
    languages: tuple[str, ...] = ()
    objects: tuple[DetectedObject, ...] = ()
    fields: tuple[KeyValue, ...] = ()
    layout: str | None = None


@dataclass(frozen=True)
class VisionFallback:
    """Why another vision backend than the configured one answered: the configured one's failure."""

    backend: str
    error_type: str
    message: str


@dataclass(frozen=True)
class VisionResult:
    """The vision stage's answer.

    `description` is the readable text a reasoning stage reads; `structured` holds the same evidence as data;
    `answer` is set for the `answer` task. `thinking` is the model's reasoning trace when thinking was on (never part
    of `answer`); `boxes` are the grounding boxes the model gave in its answer, in order. `fallback` says why
    another backend than the configured one answered (`orchestrator.stages.resilient.FallbackVision`); None when
    the configured one did.
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
    thinking: str | None = None
    boxes: tuple[Box, ...] = ()
    fallback: VisionFallback | None = None
    cached: bool = False
    """True when the orchestrator's cache answered (`orchestrator.stages.cache`)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    """Tokens the model read and wrote for this result, where the backend counts them (0 for `ocr`)."""


@dataclass(frozen=True)
class Reading:
    """What a vision-language model's text says, per task: the fields of a `VisionResult` that come from it, and
    notes on how it was read."""

    caption: str
    description: str
    structured: StructuredDescription
    answer: str | None
    thinking: str | None
    boxes: tuple[Box, ...]
    notes: tuple[str, ...] = ()

    def result(
        self,
        backend: str,
        model: str,
        task: VisionTask,
        *,
        started: float,
        notes: tuple[str, ...] = (),
        tokens: tuple[int, int] = (0, 0),
    ) -> VisionResult:
        """The `VisionResult` of this reading; `started` is the request's `time.perf_counter()` at its start; `notes`
        follow the reading's own; `tokens` are the (prompt, completion) tokens the model spent on it."""
        return VisionResult(
            backend=backend,
            model=model,
            task=task,
            caption=self.caption,
            description=self.description,
            structured=self.structured,
            answer=self.answer,
            latency_ms=(time.perf_counter() - started) * 1000,
            notes=self.notes + notes,
            thinking=self.thinking,
            boxes=self.boxes,
            prompt_tokens=tokens[0],
            completion_tokens=tokens[1],
        )
