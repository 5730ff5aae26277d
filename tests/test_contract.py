"""One contract, every backend kind: the same assertions over each way a stage can be served.

Vision: a scripted fake, the embedded `ocr` backend, the `glm` backend on a tiny random GLM-4.6V checkpoint, the
`remote` backend through our own vision stage server (serving the tiny GLM) on loopback, and the `remote` backend
against recorded vLLM responses. Reasoning: a scripted fake, the `local` backend on a tiny random GLM-4 checkpoint,
the `remote` backend through our own reasoning stage server on loopback, and the `remote` backend against recorded
vLLM responses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from reasoning_stage.backend import ReasoningBackend, StreamingReasoningBackend
from reasoning_stage.errors import ReasoningUnavailable
from reasoning_stage.local import LocalReasoningBackend
from reasoning_stage.remote import RemoteReasoningBackend
from reasoning_stage.server import create_app as reasoning_server
from reasoning_stage.types import ChatMessage, ReasoningRequest
from tests.fakes import FakeReasoning, FakeVision
from tests.fixtures.make_fixtures import HERE as FIXTURES
from tests.servers import serving
from tests.tiny_glm4v import build_tiny_glm4v
from tests.tiny_models import build_tiny_glm4
from tests.vllm_fake import FakeVllm, recorded
from vision_stage.backend import VisionBackend
from vision_stage.description import NOT_JSON_NOTE
from vision_stage.errors import VisionUnavailable
from vision_stage.glm import GlmVisionBackend
from vision_stage.images import ImageLimits, decode_image
from vision_stage.ocr import OcrVisionBackend
from vision_stage.remote import RemoteVisionBackend
from vision_stage.server import create_app as vision_server
from vision_stage.types import Box, TextLine, VisionRequest, VisionTask

VISION_KINDS = ("fake", "ocr", "glm-tiny", "remote-stage-server", "remote-recorded-vllm")
RANDOM_WEIGHTS = ("glm-tiny", "remote-stage-server")
"""Vision kinds running a tiny random checkpoint: their describe output is never usable JSON."""
REASONING_KINDS = ("fake", "local-tiny", "remote-stage-server", "remote-recorded-vllm")
RECORDED_VISION: dict[VisionTask, str] = {
    "caption": "glm46v_caption_reasoning_field",
    "answer": "glm46v_answer_thinking",
    "describe": "glm46v_describe",
}
RECEIPT = decode_image((FIXTURES / "receipt.png").read_bytes(), ImageLimits())
QUESTION = "What is the total?"
VLLM_VISION, VLLM_REASONING = "zai-org/GLM-4.6V-Flash", "zai-org/GLM-Z1-9B-0414"  # as the recordings serve them
CHAT = ReasoningRequest((ChatMessage("user", "hello there"),), max_new_tokens=12)

VisionFactory = Callable[[tuple[VisionTask, ...]], Awaitable[VisionBackend]]
ReasoningFactory = Callable[[int], Awaitable[ReasoningBackend]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("contract")
    return {"glm4v": build_tiny_glm4v(root / "glm4v"), "glm4": build_tiny_glm4(root / "glm4", stops="never")}


@pytest.fixture(scope="module")
def servers(checkpoints: dict[str, Path]) -> Iterator[dict[str, str]]:
    """Our two stage servers on loopback, each over a tiny random checkpoint, for the whole module."""
    import asyncio

    vision = asyncio.run(GlmVisionBackend.load(str(checkpoints["glm4v"])))
    reasoning = asyncio.run(LocalReasoningBackend.load(str(checkpoints["glm4"])))
    with ExitStack() as stack:
        vision_url = stack.enter_context(serving(vision_server(vision, served_model_name="tiny-glm4v"))).base_url
        reasoning_url = stack.enter_context(serving(reasoning_server(reasoning, served_model_name="tiny-glm4")))
        yield {"vision": vision_url, "reasoning": reasoning_url.base_url}


@dataclass
class Sources:
    """Where each kind of backend comes from: the tiny checkpoints, the stage servers serving them, and a stack that
    closes the recorded-vLLM clients a test opened."""

    checkpoints: dict[str, Path]
    servers: dict[str, str]
    stack: AsyncExitStack

    async def vision(self, kind: str, tasks: tuple[VisionTask, ...]) -> VisionBackend:
        if kind == "fake":
            return FakeVision()
        if kind == "ocr":
            return await OcrVisionBackend.load(tags=False)
        if kind == "glm-tiny":
            return await GlmVisionBackend.load(str(self.checkpoints["glm4v"]))
        if kind == "remote-stage-server":
            return await RemoteVisionBackend.load(base_url=self.servers["vision"], model="tiny-glm4v")
        fake = FakeVllm(VLLM_VISION, [recorded(RECORDED_VISION[task]) for task in tasks])
        fake.models = recorded("models_glm46v")
        client = await self.stack.enter_async_context(fake.client())
        return await RemoteVisionBackend.load(base_url="http://vllm.test/v1", model=VLLM_VISION, http_client=client)

    async def reasoning(self, kind: str, calls: int) -> ReasoningBackend:
        if kind == "fake":
            return FakeReasoning()
        if kind == "local-tiny":
            return await LocalReasoningBackend.load(str(self.checkpoints["glm4"]))
        if kind == "remote-stage-server":
            return await RemoteReasoningBackend.load(base_url=self.servers["reasoning"], model="tiny-glm4")
        fake = FakeVllm(VLLM_REASONING, [recorded("glm4_answer_reasoning") for _ in range(calls)])
        fake.models = recorded("models_glm_z1")
        client = await self.stack.enter_async_context(fake.client())
        return await RemoteReasoningBackend.load(
            base_url="http://vllm.test/v1", model=VLLM_REASONING, http_client=client
        )


@pytest.fixture
async def sources(checkpoints: dict[str, Path], servers: dict[str, str]) -> AsyncIterator[Sources]:
    async with AsyncExitStack() as stack:
        yield Sources(checkpoints, servers, stack)


@pytest.fixture(params=VISION_KINDS)
def vision_factory(request: pytest.FixtureRequest, sources: Sources) -> VisionFactory:
    return partial(sources.vision, request.param)


@pytest.fixture(params=REASONING_KINDS)
def reasoning_factory(request: pytest.FixtureRequest, sources: Sources) -> ReasoningFactory:
    return partial(sources.reasoning, request.param)


def assert_box(box: Box) -> None:
    assert 0 <= box.x0 <= box.x1 <= 1000
    assert 0 <= box.y0 <= box.y1 <= 1000


async def test_vision_answer(vision_factory: VisionFactory) -> None:
    backend = await vision_factory(("answer",))
    result = await backend.generate(VisionRequest(RECEIPT, QUESTION, task="answer"))
    assert (result.backend, result.model, result.task) == (backend.name, backend.model, "answer")
    assert isinstance(result.answer, str)
    assert result.answer.strip()
    assert (result.structured.facts.width, result.structured.facts.height) == (600, 800)
    assert result.latency_ms > 0
    assert result.thinking is None or "<think>" not in result.answer
    for box in result.boxes:
        assert_box(box)
    await backend.aclose()


async def test_vision_caption(vision_factory: VisionFactory) -> None:
    backend = await vision_factory(("caption",))
    result = await backend.generate(VisionRequest(RECEIPT, None, task="caption"))
    assert result.task == "caption"
    assert result.caption.strip()
    assert result.answer is None
    await backend.aclose()


async def test_vision_describe_gives_located_text_or_keeps_what_the_model_wrote(
    vision_factory: VisionFactory, request: pytest.FixtureRequest
) -> None:
    backend = await vision_factory(("describe",))
    describe = VisionRequest(RECEIPT, QUESTION, task="describe")
    if request.node.callspec.params["vision_factory"] in RANDOM_WEIGHTS:
        result = await backend.generate(describe)  # random weights write no JSON: their text is kept, and it says so
        assert NOT_JSON_NOTE in result.notes  # behind the stage server too: the text crosses the hop as written
        assert "Description written by the model" in result.description
    else:
        result = await backend.generate(describe)
        assert result.description.strip()
        assert result.structured.text_lines
        for line in result.structured.text_lines:
            assert isinstance(line, TextLine)
            assert all(0 <= x <= 600 and 0 <= y <= 800 for x, y in line.box)
    await backend.aclose()


async def test_vision_health_then_close(vision_factory: VisionFactory) -> None:
    backend = await vision_factory(())
    assert (await backend.health()).ok
    await backend.aclose()
    assert not (await backend.health()).ok
    with pytest.raises(VisionUnavailable):
        await backend.generate(VisionRequest(RECEIPT, QUESTION, task="answer"))


async def test_reasoning_answer(reasoning_factory: ReasoningFactory) -> None:
    backend = await reasoning_factory(2)
    first, second = await backend.generate(CHAT), await backend.generate(CHAT)
    assert (first.backend, first.model) == (backend.name, backend.model)
    assert first.text == second.text  # greedy decoding (or the same recording) answers the same twice
    assert first.finish_reason in ("stop", "length")
    assert first.prompt_tokens > 0
    assert first.completion_tokens > 0
    assert first.thinking is None or "<think>" not in first.text
    await backend.aclose()


async def test_reasoning_stream_matches_generate(reasoning_factory: ReasoningFactory) -> None:
    backend = await reasoning_factory(2)
    if not isinstance(backend, StreamingReasoningBackend):
        pytest.skip(f"the {backend.name} backend does not stream")
    result = await backend.generate(CHAT)
    deltas = [delta async for delta in backend.stream(CHAT)]
    assert "".join(delta.text for delta in deltas).strip() == result.text
    assert deltas[-1].finish_reason == result.finish_reason
    await backend.aclose()


async def test_reasoning_health_then_close(reasoning_factory: ReasoningFactory) -> None:
    backend = await reasoning_factory(0)
    assert (await backend.health()).ok
    await backend.aclose()
    assert not (await backend.health()).ok
    with pytest.raises(ReasoningUnavailable):
        await backend.generate(CHAT)


@pytest.mark.parametrize(
    ("codes", "table"),
    [
        ("vision_stage.remote", "vision_stage.server:VISION_ERRORS"),
        ("reasoning_stage.remote", "reasoning_stage.server:REASONING_ERRORS"),
    ],
)
def test_remote_backends_keep_our_stage_servers_error_classes(codes: str, table: str) -> None:
    import importlib

    remote = importlib.import_module(codes)
    module, name = table.split(":")
    server_codes = {status.code: cls for cls, status in getattr(importlib.import_module(module), name).items()}
    for code, cls in remote.STAGE_SERVER_CODES.items():
        assert server_codes[code] is cls
