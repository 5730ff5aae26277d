"""What the tests of the batching engine on text models share (`tests/test_local_engine.py`,
`tests/test_compiled_engine.py`): tiny random GLM-4 and Llama checkpoints on the CPU, the engine's settings and
prompts, and plain `generate`'s answers to compare with. Its fixtures (`checkpoint`, `chat`) reach every test module
through `tests/conftest.py`; a module defining its own of the same name uses that.

The checkpoints' weights are redrawn wider than their initialisation (`sharpened`), so that greedy answers vary from
token to token and an off-by-one position, a wrong mask or a row mixed up with another changes the tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from batch_engine.engine import BatchEngine
from batch_engine.settings import EngineSettings
from reasoning_stage.chat_model import ChatModel
from reasoning_stage.types import ChatMessage
from tests.tiny_models import build_tiny_glm4, build_tiny_llama

BUDGET = 20
ENGINE = EngineSettings(slots=4, max_tokens=256)
QUESTIONS = ("what is the total of this receipt ?", "who is it ?", "how many are there ?", "the date please")


def sharpened(builder: Callable[..., Path], directory: Path) -> Path:
    """A tiny checkpoint of `builder` whose matrices are redrawn wider (module docstring), saved again."""
    from transformers import AutoModelForCausalLM

    path = builder(directory / "tiny", stops="never", max_position_embeddings=1024)
    model: Any = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=[build_tiny_glm4, build_tiny_llama], ids=["glm4", "llama"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sharpened(request.param, tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def chat(checkpoint: Path) -> ChatModel:
    return ChatModel.load(str(checkpoint), device="cpu", dtype="float32", local_files_only=True)


def ids_of(chat: ChatModel, question: str) -> list[int]:
    return chat.encode_chat((ChatMessage("user", question),))


def submit(engine: BatchEngine, prompt: list[int], budget: int = BUDGET) -> Any:
    return engine.submit({"input_ids": torch.tensor([prompt])}, image_key=None, max_new_tokens=budget)


def joining(engine: BatchEngine, prompts: list[list[int]]) -> list[list[int]]:
    """The engine's answers to four prompts submitted at different steps, with budgets `BUDGET`, `BUDGET` − 1, …"""
    futures = [submit(engine, prompts[0], BUDGET)]
    engine.step()
    engine.step()
    futures.append(submit(engine, prompts[1], BUDGET - 1))
    engine.step()
    futures += [submit(engine, prompts[2], BUDGET - 2), submit(engine, prompts[3], BUDGET - 3)]
    engine.run_until_idle()
    return [future.result().ids for future in futures]
