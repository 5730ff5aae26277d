"""Reading what a vision-language model writes, per task, and writing the JSON description a GLM model would. Pure
functions.

`read_output` takes the model's whole text: thinking is split off (`stage_protocol.model_text.split_thinking`: `<think>`
blocks, a lone `</think>`, GLM-4.1V-Thinking's `<answer>` tags), control tokens a server left in are dropped, boxes are
read (`vision_stage.boxes`), and a describe answer is read in whatever shape it came (`vision_stage.description`).
Only an answer with no text at all is `VisionInvalidOutput`.

`description_json` writes that JSON from a structured description, so a backend that is not a language model (the
`ocr` stage server) can answer the describe task in the shape a GLM model would.
"""

from __future__ import annotations

import dataclasses
import json
import re

from stage_protocol.model_text import THINK_CLOSE, THINK_OPEN, split_thinking
from vision_stage.boxes import BOX_CLOSE, BOX_OPEN, extract_boxes
from vision_stage.description import read_description
from vision_stage.errors import VisionInvalidOutput
from vision_stage.render import render_description
from vision_stage.types import (
    Box,
    ImageFacts,
    Reading,
    StructuredDescription,
    TextLine,
    VisionTask,
)

__all__ = [
    "BOX_CLOSE",
    "BOX_OPEN",
    "THINK_CLOSE",
    "THINK_OPEN",
    "Reading",
    "description_json",
    "extract_boxes",
    "read_output",
    "split_thinking",
]
_CONTROL = re.compile(
    r"<\|(?:endoftext|user|assistant|system|observation|begin_of_image|end_of_image)\|>|\[gMASK\]|<sop>"
)
"""GLM's control tokens, which a server decoding with `skip_special_tokens=false` may leave in the text."""


def read_output(task: VisionTask, text: str, facts: ImageFacts, *, who: str, budget_spent: bool = False) -> Reading:
    """Interpret a model's text for `task`; `who` names the model in errors. `VisionInvalidOutput` only when there is
    no answer (`budget_spent`: the token limit was reached, so thinking may have been cut). The answer task has no
    caption; the caption and answer tasks have no structured evidence beyond `facts`."""
    thinking, answer = split_thinking(_CONTROL.sub("", text))
    if not answer:
        if thinking is not None and budget_spent:
            raise VisionInvalidOutput(
                f"{who} spent its whole token budget thinking and wrote no answer; raise "
                "ORCH_VISION__MAX_NEW_TOKENS or turn thinking off (ORCH_VISION__THINKING=false)"
            )
        raise VisionInvalidOutput(f"{who} wrote no answer for the {task} task")
    plain, boxes = extract_boxes(answer)
    if task == "describe":
        return dataclasses.replace(read_description(plain, facts), thinking=thinking, boxes=boxes)
    structured = StructuredDescription(facts)
    caption = plain.strip() if task == "caption" else ""
    answer_text = plain.strip() if task == "answer" else None
    description = render_description(caption, structured, text_read=False)
    return Reading(caption, description, structured, answer_text, thinking, boxes)


def description_json(caption: str, structured: StructuredDescription) -> str:
    """The JSON object `DESCRIBE_PROMPT` asks for, written from a structured description (boxes back on 0–1000)."""
    facts = structured.facts
    data = {
        "caption": caption,
        "text_lines": [{"text": line.text, "box": _scaled(line, facts)} for line in structured.text_lines],
        "objects": [{"label": o.label, "box": _coords(o.box)} for o in structured.objects]
        + [{"label": tag.label, "box": None} for tag in structured.tags],
        "fields": [{"key": f.key, "value": f.value} for f in structured.fields],
        "layout": structured.layout or "",
    }
    return json.dumps(data, ensure_ascii=False)


def _scaled(line: TextLine, facts: ImageFacts) -> list[float] | None:
    xs, ys = [p[0] for p in line.box], [p[1] for p in line.box]
    if facts.width <= 0 or facts.height <= 0 or max(xs) <= 0:
        return None
    scale_x, scale_y = 1000 / facts.width, 1000 / facts.height
    return [round(min(xs) * scale_x), round(min(ys) * scale_y), round(max(xs) * scale_x), round(max(ys) * scale_y)]


def _coords(box: Box | None) -> list[float] | None:
    return [box.x0, box.y0, box.x1, box.y1] if box else None
