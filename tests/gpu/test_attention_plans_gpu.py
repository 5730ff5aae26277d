"""cuDNN's attention plans as the engine lays its calls out for them (`batch_engine.attention_plans`), observed in
the graphs cuDNN's frontend logs as PyTorch builds them (`tests/gpu/cudnn_plan_cache.py`, in a process of its own
with the variables set): a call of a new power of two of the lengths builds one padded plan, which another length of
that power takes; a call met in two prefills gets a plan of exactly its own sizes and strides, which it then takes,
uncopied; both answer as PyTorch's float32 arithmetic does. GLM-4.6V-Flash's text prefill and encoder attention at a
1024×1024 image's sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
FALLBACK = "only works with Q, K, V, and output in BSHD memory layout"
"""PyTorch's warning (once a process, so one scenario a process) where a call is not laid out for the plans per power
of two."""


def _probe(scenario: str, folder: Path) -> dict[str, Any]:
    """`tests/gpu/cudnn_plan_cache.py` on `scenario`, in a process of its own."""
    environment = {
        **os.environ,
        "TORCH_CUDNN_SDPA_AVOID_RECOMPILE": "1",
        "CUDNN_FRONTEND_LOG_INFO": "1",
        "CUDNN_FRONTEND_LOG_FILE": str(folder / "frontend.log"),
    }
    ran = subprocess.run(
        [sys.executable, "-m", "tests.gpu.cudnn_plan_cache", scenario],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-4000:]
    result: dict[str, Any] = json.loads(ran.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("scenario", "power_of_two"), [("text", 2048), ("encoder", 8192)])
def test_recurring_calls_take_the_plan_built_for_them_and_others_share_the_power_of_two(
    tmp_path: Path, scenario: str, power_of_two: int
) -> None:
    probe = _probe(scenario, tmp_path)
    steps = probe["steps"]

    def step(name: str) -> dict[str, Any]:
        return steps[f"{scenario}: {name}"]  # type: ignore[no-any-return]

    assert steps["first"]["built"] == 1, "cuDNN's frontend logged no plan built: the test cannot tell"
    assert all(step(name)["executed"] == 1 for name in ("met first", "another length", "met again", "on its own plan"))

    first = step("met first")
    assert first["built"] == 1, "a new power of two of the lengths builds its plan"
    assert [(graph["padded"], graph["Q dim"][2]) for graph in first["graphs"]] == [(True, power_of_two)]
    assert step("another length")["built"] == 0, "another length of that power of two takes the same plan"
    assert step("met again")["built"] == 0

    own = step("its own plan built")
    assert own["built"] == 1, "the recurring call's plan is built"
    assert own["planned"] == 1
    call = step("call")
    assert own["graphs"] == [{"padded": False, **call}], "of exactly the call's sizes and strides"
    assert step("on its own plan")["built"] == 0, "the call then takes the plan built for it"

    assert not any(step(name)["as made"] for name in ("met first", "another length", "met again"))
    assert step("on its own plan")["as made"], "a call on its own plan is handed on uncopied"
    laid_out = [steps["first"], first, step("another length"), step("met again")]
    assert not any(FALLBACK in text for record in laid_out for text in record["warnings"])
    assert any(FALLBACK in text for text in own["warnings"]), "the process's first call not laid out so warns"

    gaps = probe["gaps"]
    assert gaps["power of two vs float32"] < 2e-2, gaps
    assert gaps["own plan vs float32"] < 2e-2, gaps
