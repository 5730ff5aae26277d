"""Parsing what a vision-language model writes (`vision_stage.parsing`), the task prompts (`vision_stage.prompts`),
and the description text rendered for the reasoning stage (`vision_stage.render`). All pure functions."""

from __future__ import annotations

import json

import pytest

from vision_stage.description import NOT_JSON_NOTE, read_description
from vision_stage.parsing import description_json, extract_boxes, split_thinking
from vision_stage.prompts import CAPTION_PROMPT, DESCRIBE_PROMPT, parse_task_prompt, task_prompt
from vision_stage.render import render_description
from vision_stage.types import (
    Box,
    ColorShare,
    DetectedObject,
    ImageFacts,
    KeyValue,
    StructuredDescription,
    Tag,
    TextLine,
    VisionTask,
)

FACTS = ImageFacts(500, 1000, "portrait", "PNG", (ColorShare("white", "#ffffff", 0.9),))
RECEIPT = {
    "caption": "A receipt from a coffee shop.",
    "text_lines": [{"text": "COFFEE 3.50", "box": [100, 50, 900, 80]}, {"text": "TOTAL 3.50", "box": None}],
    "objects": [{"label": "receipt", "box": [20, 10, 980, 990]}, "pen"],
    "fields": [{"key": "Total", "value": "3.50"}],
    "layout": "One column of items with prices on the right.",
}


def parse_description(text: str, facts: ImageFacts) -> tuple[str, StructuredDescription]:
    description = read_description(extract_boxes(text)[0], facts)
    return description.caption, description.structured


# split_thinking


@pytest.mark.parametrize(
    ("text", "thinking", "answer"),
    [
        ("<think>look at the total</think>It is 3.50.", "look at the total", "It is 3.50."),
        ("<think>\nsteps\n</think>\n\nAnswer", "steps", "Answer"),
        ("steps</think>Answer", "steps", "Answer"),  # the template opened the block in the prompt
        ("<think></think>Answer", None, "Answer"),  # thinking turned off: an empty block
        ("<think>cut off by the token lim", "cut off by the token lim", ""),
        ("  <think>cut", "cut", ""),
        ("Plain answer.", None, "Plain answer."),
        ("", None, ""),
        ("<think>a</think>b</think>c", "a", "b</think>c"),  # only the first block is thinking
        ("<think>look</think><answer>It is 3.50.</answer>", "look", "It is 3.50."),  # GLM-4.1V-Thinking
        ("<think>look</think>\n<answer>cut at the lim", "look", "cut at the lim"),
        ("look</think><answer>A</answer> trailing", "look", "A"),
        ("Plain </answer>", None, "Plain"),
    ],
)
def test_split_thinking(text: str, thinking: str | None, answer: str) -> None:
    assert split_thinking(text) == (thinking, answer)


# extract_boxes


def test_extract_boxes_reads_one_box_and_keeps_its_text() -> None:
    text, boxes = extract_boxes("The cup <|begin_of_box|>[[100, 200, 300, 400]]<|end_of_box|> is red.")
    assert text == "The cup [[100, 200, 300, 400]] is red."
    assert boxes == (Box(100, 200, 300, 400),)


def test_extract_boxes_reads_several_boxes_in_order() -> None:
    text = "<|begin_of_box|>[[1,2,3,4],[5,6,7,8]]<|end_of_box|> and <|begin_of_box|>[9.5, 10, 11, 12]<|end_of_box|>"
    assert extract_boxes(text)[1] == (Box(1, 2, 3, 4), Box(5, 6, 7, 8), Box(9.5, 10, 11, 12))


def test_extract_boxes_clamps_and_orders_corners() -> None:
    _, boxes = extract_boxes("<|begin_of_box|>[1200, 300, -5, 100]<|end_of_box|>")
    assert boxes == (Box(0, 100, 1000, 300),)


def test_extract_boxes_without_numbers_keeps_the_text_and_adds_no_box() -> None:
    assert extract_boxes("see <|begin_of_box|>the red cup<|end_of_box|>") == ("see the red cup", ())


@pytest.mark.parametrize(
    "inner", ["[1, 2, 3, 4, 5, 6]", "80.00", "1, 2, 3, 4", "Total: 12, 13, 14, 15", "[[1, 2, 3]]", "the red cup"]
)
def test_a_boxed_answer_that_is_not_coordinates_is_no_box(inner: str) -> None:
    """GLM boxes whole final answers too: only bracketed groups of four numbers are a box."""
    assert extract_boxes(f"<|begin_of_box|>{inner}<|end_of_box|>") == (inner, ())


def test_bare_coordinates_left_by_a_server_that_stripped_the_markers_are_boxes() -> None:
    text, boxes = extract_boxes(
        "the cup [[100, 200, 300, 400]] and the plate [[1,2,3,4],[5,6,7,8]] but not [9, 9, 9, 9]"
    )
    assert boxes == (Box(100, 200, 300, 400), Box(1, 2, 3, 4), Box(5, 6, 7, 8))
    assert text.startswith("the cup [[100, 200, 300, 400]]")  # the text keeps what the model wrote


def test_extract_boxes_drops_unbalanced_markup() -> None:
    assert extract_boxes("cut <|begin_of_box|>[1, 2") == ("cut [1, 2", ())
    assert extract_boxes("stray <|end_of_box|> end") == ("stray  end", ())


def test_extract_boxes_without_markup_or_double_brackets_is_identity() -> None:
    assert extract_boxes("A plain sentence [1, 2, 3, 4].") == ("A plain sentence [1, 2, 3, 4].", ())


# parse_description


def test_parse_description_reads_every_key() -> None:
    caption, structured = parse_description(json.dumps(RECEIPT), FACTS)
    assert caption == "A receipt from a coffee shop."
    assert structured.facts == FACTS
    assert [line.text for line in structured.text_lines] == ["COFFEE 3.50", "TOTAL 3.50"]
    assert [line.order for line in structured.text_lines] == [0, 1]
    # boxes on the 0–1000 scale become pixel quadrilaterals of the 500×1000 image, clockwise from top-left
    assert structured.text_lines[0].box == ((50.0, 50.0), (450.0, 50.0), (450.0, 80.0), (50.0, 80.0))
    assert structured.text_lines[1].box == ((0.0, 0.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0))
    assert structured.objects == (DetectedObject("receipt", Box(20, 10, 980, 990)), DetectedObject("pen"))
    assert structured.fields == (KeyValue("Total", "3.50"),)
    assert structured.layout == "One column of items with prices on the right."
    assert structured.tags == ()
    assert structured.languages == ()


@pytest.mark.parametrize(
    "wrap",
    [
        "```json\n{}\n```",
        "```\n{}\n```",
        "Here is the description:\n{}\nI hope this helps.",
        "Sure {{not json}} — the object: ```json\n{}\n``` done",
        "<|begin_of_box|>{}<|end_of_box|>",
    ],
)
def test_parse_description_tolerates_fences_and_text_around(wrap: str) -> None:
    caption, structured = parse_description(wrap.format(json.dumps(RECEIPT)), FACTS)
    assert caption == RECEIPT["caption"]
    assert len(structured.text_lines) == 2


def test_parse_description_reads_box_markup_inside_the_json() -> None:
    text = (
        '{"caption": "a cup", "objects": [{"label": "cup", "box": <|begin_of_box|>[[10, 20, 30, 40]]<|end_of_box|>}, '
        '{"label": "saucer", "box": "<|begin_of_box|>[50,60,70,80]<|end_of_box|>"}]}'
    )
    _, structured = parse_description(text, FACTS)
    assert structured.objects == (
        DetectedObject("cup", Box(10, 20, 30, 40)),
        DetectedObject("saucer", Box(50, 60, 70, 80)),
    )


def test_parse_description_with_missing_keys_gives_empty_parts() -> None:
    caption, structured = parse_description('{"caption": "Only a caption."}', FACTS)
    assert caption == "Only a caption."
    assert structured == StructuredDescription(FACTS)
    assert parse_description("{}", FACTS) == ("", StructuredDescription(FACTS))


def test_parse_description_accepts_nulls_and_plain_strings() -> None:
    text = '{"caption": null, "text_lines": ["first", "second"], "objects": null, "fields": [], "layout": null}'
    caption, structured = parse_description(text, FACTS)
    assert caption == ""
    assert structured.layout is None
    assert [(line.text, line.order) for line in structured.text_lines] == [("first", 0), ("second", 1)]


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("The image shows a cat.", "The image shows a cat."),
        ("[1, 2, 3]", "[1, 2, 3]"),
        ("x" * 1000, "x" * 1000),
    ],
)
def test_text_with_no_usable_json_becomes_the_description_as_written(text: str, kept: str) -> None:
    read = read_description(text, FACTS)
    assert kept in read.description
    assert read.notes == (NOT_JSON_NOTE,)
    assert read.description.startswith("Image: 500×1000 pixels")  # the facts still come first


@pytest.mark.parametrize(
    ("text", "lines", "fields", "objects"),
    [
        ('{"caption": "cut off', [], [], []),
        ("{'caption': 'single quotes', 'fields': {'Total': '3.50'}}", [], [("Total", "3.50")], []),
        ('{"text_lines": {"text": "not a list"}}', ["not a list"], [], []),
        ('{"fields": [{"key": "Total"}]}', [], [("Total", "")], []),
        ('{"objects": [{"box": [1, 2, 3, 4]}]}', [], [], ["box"]),
        ('{"text_lines": [1, 2]}', ["1", "2"], [], []),
        ('{"fields": ["Total: 3.50"]}', [], [("Total", "3.50")], []),
    ],
)
def test_json_of_other_shapes_is_read_not_refused(
    text: str, lines: list[str], fields: list[tuple[str, str]], objects: list[str]
) -> None:
    read = read_description(text, FACTS)
    assert [line.text for line in read.structured.text_lines] == lines
    assert [(kv.key, kv.value) for kv in read.structured.fields] == fields
    assert [o.label.split(" ")[0] for o in read.structured.objects] == objects


def test_parse_description_finds_a_json_array_s_first_object() -> None:
    caption, _ = parse_description('[{"caption": "first"}, {"caption": "second"}]', FACTS)
    assert caption == "first"


# description_json ↔ parse_description


def test_description_json_round_trips_through_parse_description() -> None:
    facts = ImageFacts(1000, 1000, "square", "PNG", ())
    structured = StructuredDescription(
        facts,
        text_lines=(
            TextLine("第一行 line one", ((100, 50), (900, 50), (900, 80), (100, 80)), 1.0, 0),
            TextLine("no box", ((0, 0), (0, 0), (0, 0), (0, 0)), 1.0, 1),
        ),
        objects=(DetectedObject("receipt", Box(20, 10, 980, 990)), DetectedObject("pen")),
        fields=(KeyValue("Total", "3.50"),),
        layout="one column",
    )
    caption, parsed = parse_description(description_json("A receipt.", structured), facts)
    assert caption == "A receipt."
    assert parsed == structured


def test_description_json_writes_tags_as_objects_without_boxes() -> None:
    structured = StructuredDescription(FACTS, tags=(Tag("coffee mug", 0.4),))
    data = json.loads(description_json("", structured))
    assert data["objects"] == [{"label": "coffee mug", "box": None}]
    assert parse_description(json.dumps(data), FACTS)[1].objects == (DetectedObject("coffee mug"),)


def test_description_json_scales_pixel_boxes_to_the_0_1000_scale() -> None:
    line = TextLine("t", ((50, 100), (450, 100), (450, 200), (50, 200)), 1.0, 0)
    data = json.loads(description_json("", StructuredDescription(FACTS, text_lines=(line,))))
    assert data["text_lines"] == [{"text": "t", "box": [100, 100, 900, 200]}]


# prompts


@pytest.mark.parametrize(
    ("task", "question"),
    [
        ("caption", None),
        ("describe", None),
        ("describe", "What is the total?"),
        ("describe", "这张小票一共多少钱？"),
        ("answer", "What is the total?"),
        ("answer", "Line one\nline two: with a colon"),
    ],
)
def test_task_prompt_round_trips(task: VisionTask, question: str | None) -> None:
    assert parse_task_prompt(task_prompt(task, question)) == (task, question)


def test_task_prompt_carries_the_question_only_where_it_belongs() -> None:
    assert task_prompt("caption", "ignored?") == CAPTION_PROMPT
    assert task_prompt("describe", None) == DESCRIBE_PROMPT
    assert task_prompt("describe", "What is the total?").endswith("What is the total?")
    assert task_prompt("answer", "What is the total?").endswith("What is the total?")


@pytest.mark.parametrize("question", [None, "", "   \n"])
def test_answer_prompt_needs_a_question(question: str | None) -> None:
    with pytest.raises(ValueError, match="needs a question"):
        task_prompt("answer", question)


def test_whitespace_question_counts_as_none() -> None:
    assert task_prompt("describe", "  ") == DESCRIBE_PROMPT
    assert task_prompt("answer", "  why?  ").endswith(": why?")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ("caption", None)),
        ("   ", ("caption", None)),
        (f"  {CAPTION_PROMPT}\n", ("caption", None)),
        ("What colour is the car?", ("answer", "What colour is the car?")),
        ("Answer this question about the image, from what is visible:", ("answer", None)),
        (DESCRIBE_PROMPT + "\nsomething else", ("describe", None)),
    ],
)
def test_parse_task_prompt_of_other_text(text: str, expected: tuple[VisionTask, str | None]) -> None:
    assert parse_task_prompt(text) == expected


# render_description


def test_render_description_lists_every_part_in_order() -> None:
    caption, structured = parse_description(json.dumps(RECEIPT), FACTS)
    text = render_description(caption, structured)
    assert text.splitlines() == [
        "Caption: A receipt from a coffee shop.",
        "Image: 500×1000 pixels, portrait, PNG.",
        "Dominant colours: white (#ffffff) 90%.",
        "Layout: One column of items with prices on the right.",
        "Fields (1):",
        "- Total: “3.50”",
        "Objects (2, boxes as [x0, y0, x1, y1] on a 0–1000 scale of the image):",
        "- receipt [20, 10, 980, 990]",
        "- pen (no location given)",
        "Text read by the vision model (2 lines, in reading order):",
        "1. “COFFEE 3.50”",
        "2. “TOTAL 3.50”",
    ]


def test_render_description_of_facts_only_says_no_text_was_read() -> None:
    text = render_description("", StructuredDescription(FACTS))
    assert text.splitlines() == [
        "Image: 500×1000 pixels, portrait, PNG.",
        "Dominant colours: white (#ffffff) 90%.",
        "Text: none was read in the image.",
    ]


def test_render_description_is_deterministic_and_keeps_fractional_boxes() -> None:
    structured = StructuredDescription(FACTS, objects=(DetectedObject("dot", Box(1.25, 2, 3, 4)),))
    assert render_description("c", structured) == render_description("c", structured)
    assert "- dot [1.25, 2, 3, 4]" in render_description("c", structured)


def test_an_answer_reading_does_not_claim_the_image_has_no_text() -> None:
    from vision_stage.parsing import read_output
    from vision_stage.types import ImageFacts

    facts = ImageFacts(600, 800, "portrait", "PNG", ())
    reading = read_output("answer", "The total is 54.06.", facts, who="m")
    assert "none was read" not in reading.description
    assert reading.answer == "The total is 54.06."
