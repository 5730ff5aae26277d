"""Image facts: orientation and dominant colours, on synthetic images (pure functions, no model)."""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageDraw

from vision_stage.facts import color_phrase, dominant_colors, facts_lines, image_facts, nearest_color, orientation
from vision_stage.images import ImageLimits, decode_image
from vision_stage.types import ColorShare, ImageFacts

RGB = tuple[int, int, int]


def halves(left: RGB, right: RGB, *, size: tuple[int, int] = (200, 100), split: float = 0.5) -> Image.Image:
    image = Image.new("RGB", size, left)
    ImageDraw.Draw(image).rectangle((round(size[0] * split), 0, size[0], size[1]), fill=right)
    return image


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (800, 600, "landscape"),
        (600, 800, "portrait"),
        (512, 512, "square"),
        (1000, 990, "square"),
        (1000, 950, "landscape"),
        (1, 2, "portrait"),
    ],
)
def test_orientation(width: int, height: int, expected: str) -> None:
    assert orientation(width, height) == expected


@pytest.mark.parametrize(
    ("rgb", "name"),
    [
        ((0, 0, 0), "black"),
        ((250, 250, 250), "white"),
        ((128, 128, 128), "grey"),
        ((210, 210, 210), "light grey"),
        ((230, 20, 20), "red"),
        ((20, 60, 200), "blue"),
        ((10, 10, 110), "navy"),
        ((40, 170, 60), "green"),
        ((255, 230, 20), "yellow"),
        ((255, 150, 10), "orange"),
    ],
)
def test_nearest_color_names_plain_colours(rgb: RGB, name: str) -> None:
    assert nearest_color(rgb).name == name


def test_a_solid_image_has_one_dominant_colour() -> None:
    colors = dominant_colors(Image.new("RGB", (300, 200), (200, 30, 30)))

    assert [color.name for color in colors] == ["red"]
    assert colors[0].fraction == pytest.approx(1.0)
    assert colors[0].hex == "#c81e1e"


def test_dominant_colours_are_ordered_by_share() -> None:
    colors = dominant_colors(halves((30, 160, 50), (250, 220, 0), split=0.7))

    assert [color.name for color in colors] == ["green", "yellow"]
    assert colors[0].fraction == pytest.approx(0.7, abs=0.02)
    assert colors[1].fraction == pytest.approx(0.3, abs=0.02)


def test_shades_with_one_name_are_merged_into_one_share() -> None:
    colors = dominant_colors(halves((220, 30, 30), (190, 20, 40)))

    assert [color.name for color in colors] == ["red"]
    assert colors[0].fraction == pytest.approx(1.0)
    assert colors[0].hex == "#cd1923"  # the pixel-weighted mean of the two shades


def test_thin_black_strokes_stay_black_rather_than_grey() -> None:
    image = Image.new("RGB", (600, 400), "white")
    draw = ImageDraw.Draw(image)
    for x in range(0, 600, 20):  # 2-pixel lines every 20 pixels: 10 % black
        draw.rectangle((x, 0, x + 1, 399), fill="black")

    colors = {color.name: color.fraction for color in dominant_colors(image)}

    assert set(colors) == {"white", "black"}
    assert colors["black"] == pytest.approx(0.1, abs=0.03)


def test_colours_under_the_floor_are_left_out() -> None:
    image = Image.new("RGB", (100, 100), "white")
    ImageDraw.Draw(image).rectangle((0, 0, 9, 9), fill=(20, 60, 200))  # 1 % blue

    assert [color.name for color in dominant_colors(image, min_fraction=0.02)] == ["white"]


def test_image_facts_from_decoded_bytes() -> None:
    buffer = io.BytesIO()
    halves((255, 255, 255), (20, 60, 200), size=(640, 360)).save(buffer, "PNG")

    facts = image_facts(decode_image(buffer.getvalue(), ImageLimits()))

    assert (facts.width, facts.height, facts.orientation, facts.format) == (640, 360, "landscape", "PNG")
    assert {color.name for color in facts.dominant_colors} == {"white", "blue"}
    assert sum(color.fraction for color in facts.dominant_colors) == pytest.approx(1.0)


def _facts(*colors: ColorShare) -> ImageFacts:
    return ImageFacts(width=600, height=800, orientation="portrait", format="PNG", dominant_colors=colors)


def test_colour_phrase_says_mostly_or_mainly() -> None:
    white, blue = ColorShare("white", "#ffffff", 0.8), ColorShare("blue", "#1e50dc", 0.2)

    assert color_phrase(_facts(white, blue)) == "mostly white"
    assert color_phrase(_facts(ColorShare("red", "#dc1e1e", 0.5), blue)) == "mainly red and blue"
    assert color_phrase(_facts()) == ""


def test_facts_lines_state_size_orientation_format_and_colours() -> None:
    text = "\n".join(facts_lines(_facts(ColorShare("white", "#ffffff", 0.9), ColorShare("black", "#000000", 0.1))))

    assert "600×800 pixels, portrait, PNG" in text
    assert "white (#ffffff) 90%, black (#000000) 10%" in text
