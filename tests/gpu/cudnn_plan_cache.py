"""Which of a sequence of cuDNN attention calls built a plan and which took one PyTorch had kept, for
`tests/gpu/test_attention_plans_gpu.py`: run as `python -m tests.gpu.cudnn_plan_cache text|encoder` in a process of
its own with `TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1` (PyTorch reads it once, at the process's first cuDNN attention),
`CUDNN_FRONTEND_LOG_INFO=1` and `CUDNN_FRONTEND_LOG_FILE` a file's path; prints one JSON object.

cuDNN's frontend, which PyTorch builds its attention graphs with, then logs each graph it builds (the graph as JSON:
its tensors' sizes and strides, whether lengths are padded) and each execution; a call whose plan PyTorch kept logs
only its execution. Each step below is one call under `sdpa_kernel` with cuDNN alone (a call cuDNN cannot take fails
instead of going elsewhere), made as the engine makes it: batch 1, GLM-4.6V-Flash's heads, the text prefill's K and V
read from a slot of the engine's cache, the encoder's values a view of its packed projection; laid out through
`RecurringCalls.arrange`, whose own plans `build_one` builds.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from batch_engine.attention_plans import RecurringCalls, positions_outer

Call = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
BUILT = "BUILD PLANS ALL OK"
EXECUTED = "EXECUTE PLAN  ALL OK"


def text_prefill(length: int) -> Call:
    """A prefill from position 0: the rotated queries heads outer, K and V views of one slot of a cache of slots of
    1,792 positions (three here)."""
    query = torch.randn((1, 32, length, 128), device="cuda", dtype=torch.bfloat16)
    key, value = (torch.randn((3, 2, 1792, 128), device="cuda", dtype=torch.bfloat16)[1:2, :, :length] for _ in "kv")
    return query, key, value


def encoder(patches: int) -> Call:
    """The encoder's attention over one image: the rotated queries and keys positions outer, the values a view of the
    packed q/k/v projection."""
    heads, dim = 12, 128
    packed = torch.randn((patches, 3, heads, dim), device="cuda", dtype=torch.bfloat16)
    query, key = (
        torch.randn((1, patches, heads, dim), device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in "qk"
    )
    return query, key, packed[:, 2].transpose(0, 1).unsqueeze(0)


class Steps:
    """The steps run so far: each one's plans built (the graphs, as cuDNN's frontend logged them), its executions,
    PyTorch's warnings, whether its tensors went to cuDNN as they were made, and its output."""

    def __init__(self) -> None:
        self.log = Path(os.environ["CUDNN_FRONTEND_LOG_FILE"])
        self.records: dict[str, dict[str, object]] = {}
        self.outputs: dict[str, torch.Tensor] = {}

    def run(self, name: str, work: Callable[[], tuple[torch.Tensor, bool] | None]) -> None:
        start = self._lines()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = work()
            torch.cuda.synchronize()
        logged = self._lines()[len(start) :]
        graphs = [json.loads(line) for line in logged if line.startswith("{")]
        self.records[name] = {
            "built": sum(BUILT in line for line in logged),
            "executed": sum(EXECUTED in line for line in logged),
            "graphs": [_described(graph) for graph in graphs],
            "warnings": [str(warning.message) for warning in caught],
        }
        if result is not None:
            self.outputs[name], self.records[name]["as made"] = result

    def _lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines() if self.log.exists() else []


def _described(graph: dict[str, Any]) -> dict[str, object]:
    """A logged attention graph: whether it pads lengths (a plan per power of two), Q's and V's sizes and strides."""
    tensors = graph["tensors"]
    return {
        "padded": graph["nodes"][0].get("padding_mask"),
        **{f"{name} {what}": tensors[name][what] for name in ("Q", "V") for what in ("dim", "stride")},
    }


def small() -> tuple[torch.Tensor, bool]:
    """A call of 8 tokens, laid out for the plans per power of two: the process's first cuDNN attention."""
    query, key, value = (positions_outer(tensor) for tensor in text_prefill(8))
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, enable_gqa=True), False


def scenario(steps: Steps, name: str, make: Callable[[int], Call], lengths: tuple[int, int], *, causal: bool) -> None:
    """A call met in three prefills, with a call of another length of the same power of two between; its own plan
    built after the third; then the call again. Last, the call in float32 by PyTorch's own arithmetic."""
    calls = RecurringCalls()
    call, other = make(lengths[0]), make(lengths[1])
    scale, gqa = call[0].shape[-1] ** -0.5, call[0].shape[1] != call[1].shape[1]

    def attend(tensors: Call) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(*tensors, is_causal=causal, scale=scale, enable_gqa=gqa)

    def build() -> None:
        calls.build_one()

    def prefill(tensors: Call) -> Callable[[], tuple[torch.Tensor, bool]]:
        def work() -> tuple[torch.Tensor, bool]:
            calls.turn(enabled=True)
            given = calls.arrange(*tensors, causal=causal, scale=scale, gqa=gqa)
            return attend(given), all(mine is made for mine, made in zip(given, tensors, strict=True))

        return work

    query, _, value = call
    steps.records[f"{name}: call"] = {
        "Q dim": list(query.shape), "Q stride": list(query.stride()),
        "V dim": list(value.shape), "V stride": list(value.stride()),
    }  # fmt: skip
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]), torch.inference_mode():
        steps.run(f"{name}: met first", prefill(call))
        steps.run(f"{name}: another length", prefill(other))
        steps.run(f"{name}: met again", prefill(call))
        steps.run(f"{name}: its own plan built", build)
        steps.records[f"{name}: its own plan built"]["planned"] = len(calls.planned)
        steps.run(f"{name}: on its own plan", prefill(call))
    with sdpa_kernel([SDPBackend.MATH]), torch.inference_mode():
        query, key, value = (tensor.float() for tensor in call)
        steps.outputs[f"{name}: float32"] = attend((query, key, value))


SCENARIOS: dict[str, tuple[Callable[[int], Call], tuple[int, int], bool]] = {
    "text": (text_prefill, (1397, 1300), True),
    "encoder": (encoder, (5476, 5000), False),
}
"""Each scenario's call, its two lengths of one power of two, and whether it is causal."""


def main(name: str) -> None:
    """One scenario (`SCENARIOS`) in this process: PyTorch warns once a process where a call is not laid out for
    the plans per power of two, so each scenario's first such call (its own plan's) is the one that warns."""
    steps = Steps()
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]), torch.inference_mode():
        steps.run("first", small)
    make, lengths, causal = SCENARIOS[name]
    scenario(steps, name, make, lengths, causal=causal)

    def gap(left: str, right: str) -> float:
        return (steps.outputs[left].float() - steps.outputs[right].float()).abs().max().item()

    gaps = {
        "power of two vs float32": gap(f"{name}: met first", f"{name}: float32"),
        "own plan vs float32": gap(f"{name}: on its own plan", f"{name}: float32"),
    }
    print(json.dumps({"torch": torch.__version__, "steps": steps.records, "gaps": gaps}))


if __name__ == "__main__":
    main(sys.argv[1])
