"""Programmatic dependent launch (`EngineSettings.dependent_launch`): on (by default, or when asked for) only on a
CUDA device of compute capability 9.0 or later, given to the Triton kernels' launches and to the compiled layers'
inductor options then, and to nothing otherwise. Whether the kernels launched so read what the kernel before them
wrote is a GPU test (`tests/gpu/test_kernels_gpu.py`): Triton's interpreter has no `griddepcontrol`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
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


def test_auto_is_on_only_on_a_cuda_device_of_capability_9_and_on_is_refused_elsewhere(
    capability: list[tuple[int, int]],
) -> None:
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert not triton_kernels.dependent_launch(None, cpu)
    assert not triton_kernels.dependent_launch(False, cuda)
    capability[0] = (8, 0)
    assert not triton_kernels.dependent_launch(None, cuda)
    assert triton_kernels.launch_options(cuda) == {"pdl": False}
    for refused in (cpu, cuda):
        with pytest.raises(
            ValueError, match=f"dependent launch needs .* compute capability 9.0 or later, not {refused}"
        ):
            triton_kernels.dependent_launch(True, refused)
    capability[0] = (9, 0)
    assert triton_kernels.dependent_launch(None, cuda)
    assert triton_kernels.launch_options(cuda) == {"pdl": True, "launch_pdl": True}
    # process-wide, as the kernels' operators are: another engine's start without it leaves it on, and is told so
    assert triton_kernels.dependent_launch(False, cuda)
    assert triton_kernels.launch_options(cuda) == {"pdl": True, "launch_pdl": True}
    assert not triton_kernels.dependent_launch(None, cpu)  # an engine on the CPU: its kernels are not Triton's


def test_auto_is_off_without_triton(capability: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_kernels, "available", lambda: False)
    cuda = torch.device("cuda", 0)
    assert not triton_kernels.dependent_launch(None, cuda)
    assert triton_kernels.launch_options(cuda) == {"pdl": False}


class _Launches:
    """A Triton kernel's stand-in: `kernel[grid](*args, **keywords)` records the keywords."""

    def __init__(self) -> None:
        self.keywords: list[dict[str, Any]] = []

    def __getitem__(self, grid: Any) -> Any:
        return lambda *args, **keywords: self.keywords.append(keywords)


def test_the_kernels_launch_with_the_options_for_their_tensors_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from batch_engine import decode_attention, skinny_linear

    devices: list[torch.device] = []

    def options(device: torch.device) -> dict[str, bool]:
        devices.append(device)
        return {"pdl": True, "launch_pdl": True}

    linear, split, combine = _Launches(), _Launches(), _Launches()
    monkeypatch.setattr(skinny_linear, "launch_options", options)
    monkeypatch.setattr(skinny_linear, "_KERNEL", linear)
    monkeypatch.setattr(decode_attention, "launch_options", options)
    monkeypatch.setattr(decode_attention, "_KERNELS", (split, combine))
    skinny_linear.skinny_linear(torch.zeros((2, 64)), torch.zeros((32, 64)))
    query, keys = torch.zeros((1, 4, 1, 16)), torch.zeros((1, 2, 64, 16))
    decode_attention.attend(query, keys, keys, torch.ones((1, 1, 1, 64), dtype=torch.bool), 0.25)
    for launched in (linear, split, combine):
        assert len(launched.keywords) == 1
        assert launched.keywords[0]["pdl"] is launched.keywords[0]["launch_pdl"] is True
    assert devices == [torch.device("cpu")] * 3


def test_the_engine_compiles_its_layers_for_dependent_launch_when_it_is_on(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batch_engine import steps
    from batch_engine.engine import BatchEngine
    from batch_engine.settings import EngineSettings
    from reasoning_stage.batched import REFUSALS
    from reasoning_stage.chat_model import ChatModel

    asked: list[bool | None] = []
    compiled: list[bool] = []
    model = ChatModel.load(str(checkpoint), device="cpu", dtype="float32", local_files_only=True).model
    monkeypatch.setattr(steps, "compile_model", lambda *args, dependent_launch: compiled.append(dependent_launch))
    for setting, effective in ((False, False), (None, True)):

        def decided(wanted: bool | None, device: torch.device, on: bool = effective) -> bool:
            asked.append(wanted)
            return on

        monkeypatch.setattr(triton_kernels, "dependent_launch", decided)
        settings = EngineSettings(slots=1, max_tokens=256, compile=True, dependent_launch=setting)
        assert BatchEngine(model, settings, REFUSALS).device.dependent_launch is effective
    assert asked == [False, None]
    assert compiled == [False, True]


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


_COMPILE = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from batch_engine import decode_kernel, linear_kernel

module, name, signature, constants = json.loads(sys.argv[1])
kernel = getattr({"linear_kernel": linear_kernel, "decode_kernel": decode_kernel}[module], name)
signature = signature | dict.fromkeys(constants, "constexpr")
options = {"launch_pdl": constants["pdl"], "num_warps": 4}
source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
sys.stdout.write(compiled.asm["ptx"])
"""


def _compiled_for_hopper(kernel: str, signature: dict[str, str], constants: dict[str, Any]) -> str:
    """The PTX of `kernel` (`module.name`) as Triton builds it for an H100 (compute capability 9.0), with Triton's own
    `ptxas`: no GPU. In a process of its own: this one imported Triton under its interpreter (`TRITON_INTERPRET`),
    which compiles nothing."""
    pytest.importorskip("triton")
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    argument = json.dumps([*kernel.split("."), signature, constants])
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE, argument], env=environment, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _check_waits_first(ptx: str, pdl: bool) -> None:
    """Launched dependent (`pdl`), the kernel waits for the one before, then lets the next launch, before it first
    touches global memory; else it has neither."""
    if not pdl:
        assert "griddepcontrol" not in ptx
        return
    wait = ptx.index("griddepcontrol.wait")
    assert wait < ptx.index("griddepcontrol.launch_dependents")
    assert wait < _first_memory_access(ptx)


def _first_memory_access(ptx: str) -> int:
    """Where `ptx` first reads or writes global memory (a load, a store, an asynchronous copy)."""
    accesses = ("ld.global", "st.global", "cp.async.ca", "cp.async.cg", "cp.async.bulk.tensor", "atom.global")
    found = [ptx.index(access) for access in accesses if access in ptx]
    assert found, "no access to global memory"
    return min(found)


@pytest.mark.parametrize("pdl", [False, True])
def test_the_linear_kernel_waits_for_the_kernel_before_before_it_reads_when_launched_dependent(pdl: bool) -> None:
    names = ["inputs", "weight", "bias", "out", "rows", "cols", "depth", "in_row", "weight_row", "out_row"]
    signature = {name: "*bf16" if index < 4 else "i32" for index, name in enumerate(names)}
    tiling = {"block_m": 16, "block_n": 64, "block_k": 256, "even_k": True, "has_bias": False}
    ptx = _compiled_for_hopper("linear_kernel.skinny_product", signature, {**tiling, "precision": "tf32", "pdl": pdl})
    _check_waits_first(ptx, pdl)


@pytest.mark.parametrize("pdl", [False, True])
def test_the_decode_attentions_kernels_wait_for_the_kernel_before_before_they_read_when_launched_dependent(
    pdl: bool,
) -> None:
    names = ["q_row", "q_head", "k_row", "k_head", "k_pos", "v_row", "v_head", "v_pos", "mask_row", "span", "per_split"]
    pointers = {"query": "*bf16", "keys": "*bf16", "values": "*bf16", "mask": "*i1"}
    outputs = {"partial": "*fp32", "maxima": "*fp32", "sums": "*fp32"}
    shape = {"group": 16, "block_g": 16, "head_dim": 128, "block_d": 128}
    split = _compiled_for_hopper(
        "decode_kernel.decode_split",
        pointers | outputs | dict.fromkeys(names, "i32"),
        {"scale": 0.0884, **shape, "block_n": 64, "precision": "tf32", "pdl": pdl},
    )
    combine = _compiled_for_hopper(
        "decode_kernel.decode_combine",
        outputs | {"out": "*bf16"},
        {"splits": 16, "head_dim": 128, "block_d": 128, "pdl": pdl},
    )
    for ptx in (split, combine):
        _check_waits_first(ptx, pdl)
