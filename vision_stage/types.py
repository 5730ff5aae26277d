"""What goes into and comes out of the vision stage."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import FrozenInstanceError, dataclass, field
from typing import TYPE_CHECKING, Literal

from vision_stage.errors import ImageRejected

if TYPE_CHECKING:
    from PIL import Image

VisionTask = Literal["caption", "describe", "answer"]
"""`caption`: one readable sentence; `describe`: the structured description a reasoning stage reads;
`answer`: the description plus a direct answer to the question."""

Orientation = Literal["landscape", "portrait", "square"]
Point = tuple[float, float]


class DecodedImage:
    """A validated image: its RGB pixels plus facts about the bytes it came from.

    What `vision_stage.images.decode_image` checks before it returns one, for every image: the byte count, the
    format, the declared size against the pixel limit (decompression bombs too); `sha256` is computed then too.
    The pixels are decoded then as well — EXIF orientation applied; palette, alpha, CMYK, greyscale and 16-bit
    normalised to 8-bit RGB — except for one kind of upload: an RGB PNG with no orientation to apply (its `source` is
    set) whose structure checks out whole (every chunk's length and CRC, up to IEND; one that does not is decoded at
    once, like any other image): nothing of it is inflated, and its pixels are decoded on first access to `pixels`
    (once, under a lock, then kept). A damaged
    compressed stream behind valid checksums surfaces only then, as `ImageCorrupt` (an `ImageRejected`, a 4xx
    wherever it is raised), on that and every later access. `pixels_decoded` says whether the pixels exist yet.

    `source` is the uploaded bytes when they hold exactly `pixels` (no orientation to apply, no colour conversion)
    in a format every OpenAI-compatible server reads (PNG, JPEG): a remote backend forwards them as they are instead
    of encoding the pixels again. None otherwise.

    Immutable; `DecodedImage(pixels, format, width, height, byte_size, sha256, source=None)` makes one of pixels
    already decoded, `DecodedImage.lazy(decode, …)` one whose pixels `decode()` gives when first needed."""

    __slots__ = (
        "_decode",
        "_failure",
        "_lock",
        "_pixels",
        "byte_size",
        "format",
        "height",
        "sha256",
        "source",
        "width",
    )

    format: str
    width: int
    height: int
    byte_size: int
    sha256: str
    source: bytes | None
    _pixels: Image.Image | None
    _decode: Callable[[], Image.Image] | None
    _failure: ImageRejected | None
    _lock: threading.Lock | None

    def __init__(
        self,
        pixels: Image.Image,
        format: str,
        width: int,
        height: int,
        byte_size: int,
        sha256: str,
        source: bytes | None = None,
    ) -> None:
        self._set(pixels, None, format, width, height, byte_size, sha256, source)

    @classmethod
    def lazy(
        cls,
        decode: Callable[[], Image.Image],
        format: str,
        width: int,
        height: int,
        byte_size: int,
        sha256: str,
        source: bytes | None = None,
    ) -> DecodedImage:
        """An image whose pixels `decode()` gives on first access to `pixels`; it raises `ImageRejected` when the
        bytes turn out not to decode."""
        image = cls.__new__(cls)
        image._set(None, decode, format, width, height, byte_size, sha256, source)
        return image

    def _set(
        self,
        pixels: Image.Image | None,
        decode: Callable[[], Image.Image] | None,
        format: str,
        width: int,
        height: int,
        byte_size: int,
        sha256: str,
        source: bytes | None,
    ) -> None:
        assign = object.__setattr__
        assign(self, "format", format)
        assign(self, "width", width)
        assign(self, "height", height)
        assign(self, "byte_size", byte_size)
        assign(self, "sha256", sha256)
        assign(self, "source", source)
        assign(self, "_pixels", pixels)
        assign(self, "_decode", decode)
        assign(self, "_failure", None)
        assign(self, "_lock", None if decode is None else threading.Lock())

    @property
    def pixels(self) -> Image.Image:
        """The RGB pixels, decoded now when they were not yet (see the class); `ImageRejected` when they do not."""
        pixels = self._pixels
        if pixels is not None:
            return pixels
        assert self._lock is not None  # set whenever `_pixels` starts as None
        with self._lock:
            if self._pixels is None:
                if self._failure is None:
                    assert self._decode is not None
                    try:
                        object.__setattr__(self, "_pixels", self._decode())
                    except ImageRejected as exc:
                        object.__setattr__(self, "_failure", exc)
                if self._failure is not None:
                    failure = self._failure
                    raise type(failure)(*failure.args) from None
            assert self._pixels is not None
            return self._pixels

    @property
    def pixels_decoded(self) -> bool:
        """Whether the pixels have been decoded (always, but for the lazily decoded PNG of the class's docstring)."""
        return self._pixels is not None

    def _facts(self) -> tuple[str, int, int, int, str, bytes | None]:
        return (self.format, self.width, self.height, self.byte_size, self.sha256, self.source)

    def __eq__(self, other: object) -> bool:
        """Same facts and same pixels (decoding either image's pixels when the facts match)."""
        if not isinstance(other, DecodedImage):
            return NotImplemented
        return self is other or (self._facts() == other._facts() and self.pixels == other.pixels)

    def __hash__(self) -> int:
        return hash(self._facts()[:5])

    def __repr__(self) -> str:
        return (
            f"DecodedImage(format={self.format!r}, width={self.width}, height={self.height}, "
            f"byte_size={self.byte_size}, sha256={self.sha256!r}, pixels_decoded={self.pixels_decoded})"
        )

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}: a DecodedImage is immutable")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}: a DecodedImage is immutable")

    def __copy__(self) -> DecodedImage:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> DecodedImage:
        return self  # immutable, and its pixels are never changed in place

    def __reduce__(self) -> tuple[type[DecodedImage], tuple[Image.Image, str, int, int, int, str, bytes | None]]:
        return (DecodedImage, (self.pixels, *self._facts()))


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
    prompt_tokens: int = 0
    completion_tokens: int = 0
    """Tokens the model read and wrote for this result, where the backend counts them (0 for `ocr`)."""
    """True when the orchestrator's cache answered (`orchestrator.stages.cache`)."""
