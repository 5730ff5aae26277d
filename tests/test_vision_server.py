"""The vision stage's own OpenAI-compatible server, on 127.0.0.1 under uvicorn, driven by the official `openai`
client: over the real `ocr` backend on the receipt fixture, and over a fake that thinks, grounds boxes and raises
every stage error."""

from __future__ import annotations

import asyncio
import base64
import codecs
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fakes import FakeVision
from tests.images import png_bytes
from tests.servers import RunningServer, data_url, image_message, openai_client, reset, serving
from vision_stage import errors as vision_errors
from vision_stage import server as vision_server
from vision_stage.description import read_description
from vision_stage.facts import image_facts
from vision_stage.images import ImageLimits, decode_image
from vision_stage.parsing import extract_boxes
from vision_stage.prompts import task_prompt
from vision_stage.types import Box, VisionRequest, VisionResult

RECEIPT = Path(__file__).resolve().parent / "fixtures" / "receipt.png"


@dataclass
class SeeingVision(FakeVision):
    """`FakeVision` that also thinks and grounds its answer in boxes."""

    thinking: str | None = None
    boxes: tuple[Box, ...] = ()

    async def generate(self, request: VisionRequest) -> VisionResult:
        result = await super().generate(request)
        return dataclasses.replace(result, thinking=self.thinking, boxes=self.boxes)


@pytest.fixture(scope="module")
def ocr_server() -> Iterator[RunningServer]:
    from vision_stage.ocr import OcrVisionBackend

    backend = asyncio.run(OcrVisionBackend.load())
    with serving(vision_server.create_app(backend, served_model_name="ocr")) as server:
        yield server


@pytest.fixture(scope="module")
def vision_fake_server() -> Iterator[tuple[SeeingVision, RunningServer]]:
    vision = SeeingVision()
    limits = ImageLimits(max_bytes=30_000)
    app = vision_server.create_app(vision, served_model_name="fake-vision", max_body_bytes=64_000, image_limits=limits)
    with serving(app) as server:
        yield vision, server
    assert vision.closed  # the app's lifespan closes its backend


@pytest.fixture
def fake_vision(vision_fake_server: tuple[SeeingVision, RunningServer]) -> tuple[SeeingVision, RunningServer]:
    reset(vision_fake_server[0], SeeingVision())
    return vision_fake_server


# -- the vision server over the real ocr backend -----------------------------------------------------------------------


def test_the_ocr_server_answers_the_three_tasks(ocr_server: RunningServer) -> None:
    look = openai_client(ocr_server)
    receipt = data_url(RECEIPT.read_bytes())

    def ask(text: str) -> str:
        answer = look.chat.completions.create(model="ocr", messages=image_message(text, receipt))
        return answer.choices[0].message.content or ""

    caption, described, answered = ask(task_prompt("caption", None)), ask(task_prompt("describe", None)), ask("total?")
    facts = image_facts(decode_image(RECEIPT.read_bytes(), ImageLimits()))
    structured = read_description(described, facts).structured
    assert "TOTAL54.06" in [line.text.replace(" ", "") for line in structured.text_lines]
    assert caption.startswith("A 600×800 portrait image")
    assert "54.06" in answered


def test_the_ocr_server_streams_one_delta_with_zero_usage(ocr_server: RunningServer) -> None:
    chunks = list(
        openai_client(ocr_server).chat.completions.create(
            model="ocr",
            messages=image_message("What is the total?", data_url(RECEIPT.read_bytes())),
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(contents) == 1
    assert "54.06" in (contents[0] or "")
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 0


# -- the vision server over a fake -------------------------------------------------------------------------------------


def test_thinking_and_boxes_reach_a_remote_client(fake_vision: tuple[SeeingVision, RunningServer]) -> None:
    vision, server = fake_vision
    vision.thinking, vision.boxes = "the total is at the bottom", (Box(100, 820.5, 900, 870), Box(0, 0, 1000, 40))
    messages = image_message("Where is the total?", data_url(png_bytes()))
    look = openai_client(server)
    message = look.chat.completions.create(model="fake-vision", messages=messages).choices[0].message
    chunks = list(look.chat.completions.create(model="fake-vision", messages=messages, stream=True))

    assert getattr(message, "reasoning_content", None) == "the total is at the bottom"
    text, boxes = extract_boxes(message.content or "")
    assert boxes == vision.boxes
    assert text.startswith("Text in the image most relevant to the question: “TOTAL 54.06”.")
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    assert (vision.requests[0].task, vision.requests[0].question) == ("answer", "Where is the total?")


def test_boxes_already_in_the_answer_are_not_repeated() -> None:
    box = Box(10, 20, 30, 40)
    answer = "here <|begin_of_box|>[[10,20,30,40]]<|end_of_box|>"
    assert vision_server.with_boxes(answer, (box,)) == answer
    assert extract_boxes(vision_server.with_boxes("here", (box,)))[1] == (box,)
    assert vision_server.with_boxes("here", ()) == "here"


@pytest.mark.parametrize("error_class", list(vision_server.VISION_ERRORS), ids=lambda cls: cls.__name__)
def test_each_vision_error_from_the_backend_gets_its_status(
    fake_vision: tuple[SeeingVision, RunningServer], error_class: type[vision_errors.VisionError]
) -> None:
    vision, server = fake_vision
    vision.error = error_class("scripted failure")
    body = {"messages": image_message("what?", data_url(png_bytes())), "stream": True}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    expected = vision_server.VISION_ERRORS[error_class]
    assert (response.status_code, response.json()["error"]["code"]) == expected
    unavailable = issubclass(error_class, vision_errors.VisionUnavailable)
    assert response.headers.get("retry-after") == ("5" if unavailable else None)


PNG_URL = data_url(png_bytes())


@pytest.mark.parametrize(
    ("messages", "status", "code"),
    [
        ([{"role": "user", "content": "what is it?"}], 400, "image_missing"),
        (image_message("what?", PNG_URL, PNG_URL), 400, "too_many_images"),
        (image_message("what?", "https://example.com/cat.png"), 400, "image_url_not_supported"),
        (image_message("what?", "data:text/plain;base64,aGk="), 400, "invalid_image_url"),
        (image_message("what?", "data:image/png;base64,***"), 400, "invalid_base64"),
        (image_message("what?", data_url(png_bytes()[:60])), 400, "image_corrupt"),
        (image_message("what?", data_url(b"hello, not an image")), 400, "image_unsupported"),
        (image_message("what?", data_url(b"x" * 40_000)), 400, "image_too_large"),
        (image_message("what?", data_url(b"x" * 60_000)), 413, "request_too_large"),
        ([{"role": "system", "content": "look"}], 400, "user_message_missing"),
    ],
    ids=["no-image", "two-images", "http-url", "not-image-type", "bad-base64", "corrupt", "unsupported",
         "image-too-large", "body-too-large", "no-user-message"],
)  # fmt: skip
def test_bad_images_are_refused_with_a_precise_code(
    fake_vision: tuple[SeeingVision, RunningServer], messages: list[dict[str, Any]], status: int, code: str
) -> None:
    vision, server = fake_vision
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "fake-vision", "messages": messages})
    assert (response.status_code, response.json()["error"]["code"]) == (status, code)
    assert not vision.requests  # refused before the backend saw it


PNG = png_bytes(color="red")


@pytest.mark.parametrize(
    "url",
    [
        "DATA:image/png;BASE64," + base64.b64encode(PNG).decode(),
        "data:image/png;base64," + base64.urlsafe_b64encode(PNG).decode().rstrip("="),
        "data:image/png;base64," + codecs.encode(PNG, "base64").decode(),  # MIME lines of 76 characters
    ],
    ids=["upper-case", "url-safe-unpadded", "mime-lines"],
)
def test_data_urls_are_read_as_the_orchestrator_reads_them(
    fake_vision: tuple[SeeingVision, RunningServer], url: str
) -> None:
    vision, server = fake_vision
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": image_message("what?", url)})
    assert response.status_code == 200
    assert vision.requests[0].image.source == PNG


def test_vision_server_request_errors(fake_vision: tuple[SeeingVision, RunningServer]) -> None:
    vision, server = fake_vision
    look = openai_client(server)
    with pytest.raises(openai.NotFoundError):
        look.chat.completions.create(model="glm-4.6v", messages=image_message("what?", PNG_URL))
    with pytest.raises(openai.BadRequestError) as caught:
        look.chat.completions.create(model="fake-vision", messages=image_message("what?", PNG_URL), n=2)
    assert caught.value.param == "n"
    bad_json = httpx.post(
        f"{server.url}/v1/chat/completions", content=b"{", headers={"content-type": "application/json"}
    )
    assert bad_json.json()["error"]["code"] == "invalid_json"
    assert [model.id for model in look.models.list()] == ["fake-vision", "fake"]  # the backend's name too
    by_backend = look.chat.completions.create(model="fake", messages=image_message("what?", PNG_URL))
    assert by_backend.model == "fake-vision"
    vision.healthy = False
    unhealthy = httpx.get(f"{server.url}/health")
    assert (unhealthy.status_code, unhealthy.json()["status"], unhealthy.headers["retry-after"]) == (
        503,
        "unavailable",
        "5",
    )
