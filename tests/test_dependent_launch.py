"""Programmatic dependent launch (`EngineSettings.dependent_launch`): on only where asked for on a CUDA device of
compute capability 9.0 or later, given to the Triton kernels' launches and to the compiled layers' inductor options
then, and to nothing otherwise. Whether the kernels launched so read what the kernel before them wrote is a GPU test
(`tests/gpu/test_kernels_gpu.py`): Triton's interpreter has no `griddepcontrol`."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from batch_engine import triton_kernels
from batch_engine.compiling import compile_model


@pytest.fixture
def capability(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The CUDA device's compute capability, as `torch.cuda` would give it; the process-wide switch reset."""
    given = [(9, 0)]
    monkeypatch.setattr(triton_kernels, "_DEPENDENT_LAUNCH", False)
    monkeypatch.setattr(triton_kernels, "available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: given[0])
    return given


def test_dependent_launch_is_on_only_where_asked_for_on_a_device_of_capability_9(
    capability: list[tuple[int, int]],
) -> None:
    cuda = torch.device("cuda", 0)
    assert not triton_kernels.dependent_launch(True, torch.device("cpu"))
    assert not triton_kernels.dependent_launch(False, cuda)
    capability[0] = (8, 0)
    assert not triton_kernels.dependent_launch(True, cuda)
    assert triton_kernels.launch_options() == {"pdl": False}
    capability[0] = (9, 0)
    assert triton_kernels.dependent_launch(True, cuda)
    assert triton_kernels.launch_options() == {"pdl": True, "launch_pdl": True}
    # process-wide, as the kernels' operators are: another engine's start without it leaves it on
    assert not triton_kernels.dependent_launch(False, cuda)
    assert triton_kernels.launch_options() == {"pdl": True, "launch_pdl": True}


def test_the_kernels_launch_without_it_where_it_is_not_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_kernels, "_DEPENDENT_LAUNCH", False)
    monkeypatch.setattr(triton_kernels, "available", lambda: False)
    assert not triton_kernels.dependent_launch(True, torch.device("cuda", 0))
    assert triton_kernels.launch_options() == {"pdl": False}


class _Layer:
    def __init__(self) -> None:
        self.compiled: dict[str, Any] | None = None

    def compile(self, **options: Any) -> None:
        self.compiled = options


@pytest.mark.parametrize("dependent", [False, True])
def test_the_compiled_layers_launch_dependent_only_when_asked(dependent: bool) -> None:
    layers = [_Layer(), _Layer()]
    model = SimpleNamespace(model=SimpleNamespace())  # a text model: no vision encoder
    compile_model(model, SimpleNamespace(layers=layers), "automatic", dependent_launch=dependent)
    expected = {"triton.enable_pdl": True} if dependent else None
    assert [layer.compiled for layer in layers] == [{"dynamic": None, "options": expected}] * 2
    assert hasattr(torch._inductor.config.triton, "enable_pdl")  # the torch the project pins has the option


def test_the_linear_kernel_prefetches_whole_16_bytes_of_aligned_rows_only_with_dependent_launch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from batch_engine import skinny_linear

    weight = torch.zeros((8, 4096), dtype=torch.bfloat16)
    monkeypatch.setattr(triton_kernels, "_DEPENDENT_LAUNCH", False)
    assert skinny_linear.prefetch_bytes(weight) == 0
    monkeypatch.setattr(triton_kernels, "_DEPENDENT_LAUNCH", True)
    assert skinny_linear.prefetch_bytes(weight) == skinny_linear.PREFETCH_BYTES == 2048
    assert skinny_linear.prefetch_bytes(weight[:, :1000]) == 2000  # the whole row, 2,000 bytes
    assert skinny_linear.prefetch_bytes(weight[:, :999]) == 1984  # within the row, in whole 16 bytes
    assert skinny_linear.prefetch_bytes(weight.view(-1)[1:4097].view(1, 4096)) == 0  # a row at an odd address
    assert (
        skinny_linear.prefetch_bytes(torch.zeros((8, 4099), dtype=torch.bfloat16)[:, :4096]) == 0
    )  # rows 8,198 B apart
