"""The task prompts sent to a vision-language model, and recognising them again on the serving side.

The `glm` backend and the `remote` backend send these same prompts, so a GLM-4.6V-Flash in-process, behind vLLM or
behind our own stage server is asked the same thing. `parse_task_prompt` lets our stage server recognise which task
a prompt asks for (the `ocr` backend then answers that task its own way); any other text is a plain question.
"""

from __future__ import annotations

from vision_stage.types import VisionTask

CAPTION_PROMPT = "Describe this image in one sentence."

DESCRIBE_PROMPT = (
    "Describe this image as one JSON object and output only that object, with these keys:\n"
    '"caption": one sentence about the whole image;\n'
    '"text_lines": every line of text in reading order, each {"text": "...", "box": [x0, y0, x1, y1]};\n'
    '"objects": the main objects and people, each {"label": "...", "box": [x0, y0, x1, y1]};\n'
    '"fields": labelled values such as totals, dates, names and amounts, each {"key": "...", "value": "..."};\n'
    '"layout": one sentence on how the content is arranged.\n'
    "Boxes are on a 0-1000 scale relative to the image width and height. Copy text exactly as written; use empty "
    "lists when there is nothing of a kind."
)

_DESCRIBE_FOR = "\nThe description will be used to answer this question: "
_ANSWER_PREFIX = "Answer this question about the image, from what is visible: "


def task_prompt(task: VisionTask, question: str | None) -> str:
    """The user text for `task`; `question` (when given) is carried in the describe and answer prompts. A question of
    only whitespace counts as none."""
    question = (question or "").strip() or None
    if task == "caption":
        return CAPTION_PROMPT
    if task == "describe":
        return DESCRIBE_PROMPT + (_DESCRIBE_FOR + question if question else "")
    if not question:
        raise ValueError("the answer task needs a question")
    return _ANSWER_PREFIX + question


def parse_task_prompt(text: str) -> tuple[VisionTask, str | None]:
    """The task and question a prompt from `task_prompt` asks for; any other non-empty text is a question to answer,
    and empty text asks for a caption."""
    stripped = text.strip()
    if not stripped or stripped == CAPTION_PROMPT:
        return "caption", None
    if stripped.startswith(DESCRIBE_PROMPT):
        rest = stripped[len(DESCRIBE_PROMPT) :]
        question = rest[len(_DESCRIBE_FOR) :].strip() if rest.startswith(_DESCRIBE_FOR) else ""
        return "describe", question or None
    if stripped == _ANSWER_PREFIX.strip():
        return "answer", None
    if stripped.startswith(_ANSWER_PREFIX):
        return "answer", stripped[len(_ANSWER_PREFIX) :].strip() or None
    return "answer", stripped
