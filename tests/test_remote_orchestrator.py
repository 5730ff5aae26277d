"""The orchestrator with both stages remote (our stage servers on loopback) answers in the same shape as in-process."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.settings import Settings
from orchestrator.stage_settings import LocalReasoningSettings, RemoteReasoningSettings, RemoteVisionSettings
from orchestrator.wiring import Backends
from reasoning_stage.local import LocalReasoningBackend
from reasoning_stage.server import create_app as reasoning_server
from tests.fixtures.make_fixtures import HERE as FIXTURES
from tests.servers import serving
from tests.tiny_models import build_tiny_llama
from vision_stage.ocr import OcrVisionBackend
from vision_stage.server import create_app as vision_server

pytestmark = pytest.mark.slow
RECEIPT = (FIXTURES / "receipt.png").read_bytes()
QUESTIONS = ("What is the total?", "Why is the total higher than the subtotal?")


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("llm"), stops="never", max_position_embeddings=4096)


def load_backends(llm: Path) -> Backends:
    async def load() -> Backends:
        return Backends(await OcrVisionBackend.load(), await LocalReasoningBackend.load(str(llm)))

    return asyncio.run(load())


@pytest.fixture(scope="module")
def remote_settings(llm: Path) -> Iterator[Settings]:
    backends = load_backends(llm)
    with ExitStack() as stack:
        vision = stack.enter_context(serving(vision_server(backends.vision, served_model_name="ocr")))
        reasoning = stack.enter_context(serving(reasoning_server(backends.reasoning, served_model_name="tiny")))
        yield Settings(
            vision=RemoteVisionSettings(base_url=vision.base_url, model="ocr"),
            reasoning=RemoteReasoningSettings(base_url=reasoning.base_url, model="tiny", max_new_tokens=8),
        )


def ask(client: TestClient, question: str) -> dict[str, Any]:
    files = {"image": ("receipt.png", RECEIPT, "image/png")}
    response = client.post("/v1/analyze", files=files, data={"question": question})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def shape(value: Any) -> Any:
    """The JSON structure with leaves replaced by their type; a list by the shape of its first element."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def assert_same_shape(local: Any, remote: Any, path: str = "") -> None:
    """Same keys everywhere; same leaf types where both sides have a value (null and [] match anything)."""
    if "NoneType" in (local, remote) or [] in (local, remote):
        return
    if isinstance(local, dict):
        assert isinstance(remote, dict), path
        assert set(local) == set(remote), f"{path}: {sorted(set(local) ^ set(remote))}"
        for key in local:
            assert_same_shape(local[key], remote[key], f"{path}.{key}")
    elif isinstance(local, list):
        assert isinstance(remote, list), path
        assert_same_shape(local[0], remote[0], f"{path}[]")
    else:
        assert {local, remote} <= {"int", "float"} or local == remote, f"{path}: {local} vs {remote}"


def test_both_stages_remote_answer_in_the_in_process_shape(llm: Path, remote_settings: Settings) -> None:
    in_process = Settings(reasoning=LocalReasoningSettings(max_new_tokens=8))
    with TestClient(create_app(in_process, load_backends(llm))) as local_client:
        local = [ask(local_client, question) for question in QUESTIONS]
    with TestClient(create_app(remote_settings)) as remote_client:  # the lifespan builds the remote backends
        ready = remote_client.get("/ready").json()
        remote = [ask(remote_client, question) for question in QUESTIONS]
    assert (ready["ready"], ready["vision"]["backend"], ready["reasoning"]["backend"]) == (True, "remote", "remote")
    for local_body, remote_body in zip(local, remote, strict=True):
        assert_same_shape(shape(local_body), shape(remote_body))
        assert (remote_body["vision"]["backend"], remote_body["mode"]) == ("remote", local_body["mode"])
    vision_only, reasoned = remote
    assert "54.06" in vision_only["answer"]
    assert reasoned["mode"] == "vision_then_reasoning"
    assert reasoned["reasoning"]["backend"] == "remote"
    assert reasoned["reasoning"]["completion_tokens"] == 8
    assert any(line["text"].replace(" ", "") == "TOTAL54.06" for line in reasoned["vision"]["structured"]["text_lines"])
