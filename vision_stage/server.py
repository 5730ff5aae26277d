"""The vision stage as its own OpenAI-compatible server: `create_app(backend, served_model_name=...)`.

`POST /v1/chat/completions` reads the last user message: exactly one `image_url` part holding a
`data:image/...;base64,...` URL, read as the orchestrator reads one (`stage_protocol.data_url`; http(s) URLs are
refused with 400 `image_url_not_supported`: this server fetches nothing), and text, which
`vision_stage.prompts.parse_task_prompt` turns into a task. Earlier messages are ignored: each request is one look at
one image. The message content returned is, per task:

- `caption`: the caption;
- `describe`: the JSON object `DESCRIBE_PROMPT` asks for (`vision_stage.parsing.description_json`), which
  `vision_stage.description.read_description` reads back; or, when the backend's model wrote its description in
  another form than JSON, that text as it wrote it, so that a remote client reads the same description from it (and
  what the model wrote around its JSON follows the JSON);
- `answer`: the answer, followed by the grounding boxes as `<|begin_of_box|>[[x0,y0,x1,y1]]<|end_of_box|>` (0–1000
  scale) when the backend gave boxes that the answer text does not already carry, so a remote client recovers the
  same boxes with `vision_stage.parsing.extract_boxes`.

The model's thinking, when it produced some, is the message's `reasoning_content` (vLLM's field). A streamed answer
(`stream: true`) is sent as one thinking delta and one content delta: vision backends produce whole structured
results, not token streams, so the backend runs to the end before the first event and its errors still get an HTTP
status. `chat_template_kwargs.enable_thinking` is accepted and ignored: no vision backend switches thinking per request
(the `glm` backend's thinking is set when it is loaded), nor takes a token limit or temperature per request
(`max_tokens` and `temperature` are accepted and ignored). Token usage is reported as zeros: the backends do not count
tokens.

What both stage servers share (the names served, `GET /v1/models`, `GET /health`, the body limit, OpenAI-shaped
errors) is `stage_protocol.server.app`'s; `VISION_ERRORS` maps every error of the vision stage to its status and code.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI

from stage_protocol.backend import Delta
from stage_protocol.data_url import Base64Invalid, Base64TooLarge, DataUrlInvalid, NotDataUrl, decode_data_url
from stage_protocol.server.app import create_stage_app
from stage_protocol.server.errors import ApiError, ErrorTable, Status
from stage_protocol.server.openai import ChatCompletionRequest, Completion, MessageIn
from vision_stage import errors
from vision_stage.backend import VisionBackend
from vision_stage.description import NOT_JSON_NOTE, remarks, written_text
from vision_stage.images import ImageLimits, decode_image
from vision_stage.parsing import BOX_CLOSE, BOX_OPEN, description_json, extract_boxes
from vision_stage.prompts import parse_task_prompt
from vision_stage.types import Box, VisionRequest, VisionResult, VisionTask

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
"""Room for a base64 image at `ImageLimits`' default 20 MiB (about 27 MiB encoded) and the rest of the request."""

VISION_ERRORS: dict[type[errors.VisionError], Status] = {
    errors.ImageEmpty: Status(400, "image_empty"),
    errors.ImageTooLarge: Status(400, "image_too_large"),
    errors.ImageTooManyPixels: Status(400, "image_too_many_pixels"),
    errors.ImageUnsupported: Status(400, "image_unsupported"),
    errors.ImageCorrupt: Status(400, "image_corrupt"),
    errors.VisionUnavailable: Status(503, "vision_unavailable"),
    errors.VisionOverloaded: Status(503, "vision_overloaded"),
    errors.VisionRejected: Status(400, "vision_rejected"),
    errors.VisionInvalidOutput: Status(502, "vision_invalid_output"),
}
"""Every error of the vision stage's tree: its HTTP status and OpenAI `code` (a test checks every leaf is here)."""
ERRORS = ErrorTable("vision", errors.VisionError, VISION_ERRORS, log)

USER_MESSAGE_MISSING = Status(400, "user_message_missing")
IMAGE_MISSING = Status(400, "image_missing")
TOO_MANY_IMAGES = Status(400, "too_many_images")
IMAGE_URL_NOT_SUPPORTED = Status(400, "image_url_not_supported")
INVALID_IMAGE_URL = Status(400, "invalid_image_url")
INVALID_BASE64 = Status(400, "invalid_base64")


def create_app(
    backend: VisionBackend,
    *,
    served_model_name: str,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    image_limits: ImageLimits | None = None,
) -> FastAPI:
    """An app serving `backend` under `served_model_name` (`stage_protocol.server.app`); it owns the backend and
    closes it at shutdown."""
    answers = VisionAnswers(backend, image_limits or ImageLimits())
    return create_stage_app(answers, ERRORS, served_model_name=served_model_name, max_body_bytes=max_body_bytes)


@dataclass(frozen=True)
class VisionAnswers:
    """One look at one image per request (module docstring); a streamed answer is the whole one in two pieces."""

    backend: VisionBackend
    limits: ImageLimits

    async def complete(self, body: ChatCompletionRequest) -> Completion:
        request = await read_vision_request(body, self.limits)
        result = await self.backend.generate(request)
        return Completion(content_of(request.task, result), result.thinking)

    async def stream(self, body: ChatCompletionRequest) -> AsyncIterator[Delta]:
        answer = await self.complete(body)
        yield Delta(thinking=answer.thinking or "")
        yield Delta(text=answer.text, finish_reason="stop")


async def read_vision_request(body: ChatCompletionRequest, limits: ImageLimits) -> VisionRequest:
    """The vision request the last user message asks for: its one image, decoded, and its text's task."""
    index, message = _last_user_message(body.messages)
    param = f"messages.{index}.content"
    urls = message.image_urls()
    if len(urls) != 1:
        status = IMAGE_MISSING if not urls else TOO_MANY_IMAGES
        raise ApiError(
            status, f"the last user message must hold exactly one image_url part; it holds {len(urls)}", param=param
        )
    data = data_url_bytes(urls[0], limits.max_bytes, param=param)
    image = await asyncio.to_thread(decode_image, data, limits)
    task, question = parse_task_prompt(message.text())
    return VisionRequest(image=image, question=question, task=task)


def _last_user_message(messages: list[MessageIn]) -> tuple[int, MessageIn]:
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].role == "user":
            return index, messages[index]
    raise ApiError(USER_MESSAGE_MISSING, "the request has no user message to answer", param="messages")


def data_url_bytes(url: str, max_bytes: int, *, param: str | None = None) -> bytes:
    """The bytes of a `data:image/...;base64,...` URL (`stage_protocol.data_url`); refuses http(s) and other URLs,
    and what decodes too large."""
    try:
        return decode_data_url(url, max_bytes)
    except (NotDataUrl, DataUrlInvalid) as exc:
        if isinstance(exc, NotDataUrl) and exc.scheme in ("http", "https"):
            message = "this server fetches no image URLs: send the image inline as a data:image/...;base64,... URL"
            raise ApiError(IMAGE_URL_NOT_SUPPORTED, message, param=param) from None
        message = "the image URL must be a data:image/...;base64,... URL"
        raise ApiError(INVALID_IMAGE_URL, message, param=param) from None
    except Base64TooLarge:
        raise errors.ImageTooLarge(f"the image decodes to more than {max_bytes} bytes; that is the limit") from None
    except Base64Invalid as exc:
        raise ApiError(INVALID_BASE64, f"the image's base64 does not decode: {exc}", param=param) from None


def content_of(task: VisionTask, result: VisionResult) -> str:
    """The message content for `task` (see the module docstring)."""
    if task == "caption":
        return result.caption
    if task == "describe":  # a model's description that was not JSON goes on as it wrote it: nothing is lost
        written = written_text(result.description) if NOT_JSON_NOTE in result.notes else None
        if written is not None:
            return written
        around = remarks(result.description)
        described = description_json(result.caption, result.structured)
        return f"{described}\n{around}" if around else described
    if result.answer is None:
        raise errors.VisionInvalidOutput(f"the vision backend {result.backend!r} gave no answer to the question")
    return with_boxes(result.answer, result.boxes)


def with_boxes(answer: str, boxes: tuple[Box, ...]) -> str:
    """`answer` followed by `boxes` as GLM box markup, unless `answer` already carries exactly those boxes."""
    if not boxes or extract_boxes(answer)[1] == boxes:
        return answer
    markup = " ".join(f"{BOX_OPEN}[[{_n(b.x0)},{_n(b.y0)},{_n(b.x1)},{_n(b.y1)}]]{BOX_CLOSE}" for b in boxes)
    return f"{answer} {markup}" if answer else markup


def _n(value: float) -> str:
    return f"{round(value, 2):g}"
