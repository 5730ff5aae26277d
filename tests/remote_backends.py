"""What the `remote` backends' tests share: the models, the requests, and one call of each backend against a
`FakeVllm`."""

from __future__ import annotations

from reasoning_stage.remote import RemoteReasoningBackend
from reasoning_stage.types import ChatMessage, ReasoningDelta, ReasoningRequest, ReasoningResult
from tests.images import decoded
from tests.vllm_fake import FakeVllm
from vision_stage.remote import RemoteVisionBackend
from vision_stage.types import VisionRequest, VisionResult, VisionTask

VISION_MODEL = "zai-org/GLM-4.6V-Flash"
LLM_MODEL = "zai-org/GLM-Z1-9B-0414"
BASE_URL = "http://vllm.test:8000/v1"
QUESTION = "Where is the total on this receipt?"
CHAT = (ChatMessage("system", "You answer briefly."), ChatMessage("user", "Is this receipt reimbursable?"))


async def look(
    fake: FakeVllm, request: VisionRequest, *, thinking: bool = False, pass_image_urls: bool = False
) -> VisionResult:
    backend = await RemoteVisionBackend.load(
        base_url=BASE_URL,
        model=fake.model,
        thinking=thinking,
        pass_image_urls=pass_image_urls,
        http_client=fake.client(),
    )
    try:
        return await backend.generate(request)
    finally:
        await backend.aclose()


async def ask(fake: FakeVllm, request: ReasoningRequest | None = None) -> ReasoningResult:
    backend = await RemoteReasoningBackend.load(base_url=BASE_URL, model=fake.model, http_client=fake.client())
    try:
        return await backend.generate(request or ReasoningRequest(CHAT))
    finally:
        await backend.aclose()


async def stream(fake: FakeVllm, deltas: list[ReasoningDelta]) -> None:
    """Stream `ReasoningRequest(CHAT)` into `deltas` (kept when it raises midway)."""
    backend = await RemoteReasoningBackend.load(base_url=BASE_URL, model=fake.model, http_client=fake.client())
    try:
        async for delta in backend.stream(ReasoningRequest(CHAT)):
            deltas.append(delta)
    finally:
        await backend.aclose()


def answer_request(task: VisionTask = "answer", image_url: str | None = None) -> VisionRequest:
    return VisionRequest(decoded((64, 48)), QUESTION, task=task, image_url=image_url)
