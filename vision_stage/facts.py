"""Facts about an image that need no model: size, orientation, format and dominant colours.

Everything here is a pure function of the pixels. Dominant colours: take a nearest-neighbour sample of at most
128 pixels a side (real pixel colours, so thin black text is not blended into grey), quantise it with Pillow's fast
octree, name each palette entry after the nearest colour of `NAMED_COLORS`, and merge the entries that got one name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from vision_stage.types import ColorShare, DecodedImage, ImageFacts, Orientation

THUMBNAIL_SIDE = 128
SQUARE_TOLERANCE = 0.02
"""Width and height within 2 % of each other count as square."""

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class NamedColor:
    name: str
    name_zh: str
    rgb: RGB


NAMED_COLORS: tuple[NamedColor, ...] = (
    NamedColor("black", "黑色", (0, 0, 0)),
    NamedColor("dark grey", "深灰色", (72, 72, 72)),
    NamedColor("grey", "灰色", (128, 128, 128)),
    NamedColor("light grey", "浅灰色", (200, 200, 200)),
    NamedColor("white", "白色", (255, 255, 255)),
    NamedColor("red", "红色", (220, 30, 30)),
    NamedColor("dark red", "深红色", (128, 0, 0)),
    NamedColor("pink", "粉色", (250, 160, 190)),
    NamedColor("orange", "橙色", (250, 140, 0)),
    NamedColor("brown", "棕色", (135, 80, 35)),
    NamedColor("beige", "米色", (230, 215, 175)),
    NamedColor("yellow", "黄色", (250, 220, 0)),
    NamedColor("olive", "橄榄色", (128, 128, 0)),
    NamedColor("green", "绿色", (30, 160, 50)),
    NamedColor("dark green", "深绿色", (0, 90, 30)),
    NamedColor("teal", "青绿色", (0, 128, 128)),
    NamedColor("cyan", "青色", (0, 200, 220)),
    NamedColor("light blue", "浅蓝色", (135, 200, 240)),
    NamedColor("blue", "蓝色", (30, 80, 220)),
    NamedColor("navy", "藏青色", (0, 0, 110)),
    NamedColor("purple", "紫色", (128, 40, 160)),
)
_ZH_NAMES = {color.name: color.name_zh for color in NAMED_COLORS}
ORIENTATION_ZH: dict[Orientation, str] = {"landscape": "横向", "portrait": "竖向", "square": "方形"}


def image_facts(image: DecodedImage, *, max_colors: int = 4, colors: bool = True) -> ImageFacts:
    """The facts; with `colors=False`, no dominant colours (an empty tuple), so the pixels need not be decoded."""
    return ImageFacts(
        width=image.width,
        height=image.height,
        orientation=orientation(image.width, image.height),
        format=image.format,
        dominant_colors=dominant_colors(image.pixels, max_colors=max_colors) if colors else (),
    )


def orientation(width: int, height: int) -> Orientation:
    if abs(width - height) <= SQUARE_TOLERANCE * max(width, height):
        return "square"
    return "landscape" if width > height else "portrait"


def nearest_color(rgb: RGB) -> NamedColor:
    """The entry of `NAMED_COLORS` closest to `rgb` by the "redmean" weighted RGB distance."""
    return min(NAMED_COLORS, key=lambda color: _distance(rgb, color.rgb))


def _distance(a: RGB, b: RGB) -> float:
    red_mean = (a[0] + b[0]) / 2
    dr, dg, db = a[0] - b[0], a[1] - b[1], a[2] - b[2]
    return (2 + red_mean / 256) * dr * dr + 4 * dg * dg + (2 + (255 - red_mean) / 256) * db * db


def dominant_colors(pixels: Image.Image, *, max_colors: int = 4, min_fraction: float = 0.02) -> tuple[ColorShare, ...]:
    """The named colours covering at least `min_fraction` of the image, largest share first.

    The hex value of a merged colour is the pixel-weighted mean of the palette entries that share its name.
    """
    thumbnail = _sample(pixels.convert("RGB"))
    palette_image = thumbnail.quantize(colors=max(2, 2 * max_colors), method=Image.Quantize.FASTOCTREE)
    counts = _palette_counts(palette_image)
    total = sum(count for count, _ in counts)
    groups: dict[str, list[tuple[int, RGB]]] = {}
    for count, rgb in counts:
        groups.setdefault(nearest_color(rgb).name, []).append((count, rgb))
    shares = [_merge(name, members, total) for name, members in groups.items()]
    shares.sort(key=lambda share: share.fraction, reverse=True)
    return tuple(share for share in shares[:max_colors] if share.fraction >= min_fraction)


def _sample(pixels: Image.Image) -> Image.Image:
    """At most THUMBNAIL_SIDE pixels a side, by nearest-neighbour sampling: real pixel colours, not blends."""
    scale = min(1.0, THUMBNAIL_SIDE / max(pixels.size))
    size = (max(1, round(pixels.width * scale)), max(1, round(pixels.height * scale)))
    return pixels.resize(size, Image.Resampling.NEAREST)


def _palette_counts(palette_image: Image.Image) -> list[tuple[int, RGB]]:
    """(pixel count, RGB) for each palette entry a quantised ("P" mode) image uses."""
    palette = palette_image.getpalette() or []
    counts = []
    for count, index in palette_image.getcolors() or []:
        if isinstance(index, int):
            counts.append((count, (palette[3 * index], palette[3 * index + 1], palette[3 * index + 2])))
    return counts


def _merge(name: str, members: Sequence[tuple[int, RGB]], total: int) -> ColorShare:
    weight = sum(count for count, _ in members)
    mean = [round(sum(count * rgb[channel] for count, rgb in members) / weight) for channel in range(3)]
    return ColorShare(name=name, hex="#{:02x}{:02x}{:02x}".format(*mean), fraction=weight / total)


def color_phrase(facts: ImageFacts) -> str:
    """`mostly white`, `mainly red and blue`, or `` when no colour was found."""
    colors = facts.dominant_colors
    if not colors:
        return ""
    if colors[0].fraction >= 0.6 or len(colors) == 1:
        return f"mostly {colors[0].name}"
    return f"mainly {colors[0].name} and {colors[1].name}"


def color_phrase_zh(facts: ImageFacts) -> str:
    """`主要是白色`, `主要是红色和蓝色`, or `` when no colour was found."""
    colors = facts.dominant_colors
    if not colors:
        return ""
    first = _ZH_NAMES.get(colors[0].name, colors[0].name)
    if colors[0].fraction >= 0.6 or len(colors) == 1:
        return f"主要是{first}"
    return f"主要是{first}和{_ZH_NAMES.get(colors[1].name, colors[1].name)}"


def facts_lines(facts: ImageFacts) -> tuple[str, ...]:
    """The facts as lines of the description a reasoning stage reads."""
    colors = ", ".join(f"{c.name} ({c.hex}) {c.fraction:.0%}" for c in facts.dominant_colors) or "unknown"
    return (
        f"Image: {facts.width}×{facts.height} pixels, {facts.orientation}, {facts.format}.",
        f"Dominant colours: {colors}.",
    )
