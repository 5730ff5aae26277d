"""The dtypes an in-process model runs in, by the names settings and command lines give them (`auto` aside, which
each stage's loader resolves its own way): one list for the `glm` vision backend and the `local` reasoning backend."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "bfloat16", "float16")
"""The names besides `auto`; `orchestrator.stage_settings.Dtype` lists the same."""


def named_dtype(name: str) -> torch.dtype:
    """The torch dtype called `name`, one of `DTYPES`; a `ValueError` naming the choices otherwise (float64, which
    torch has, included: no stage runs in it)."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use auto, {', '.join(DTYPES[:-1])} or {DTYPES[-1]}")
    value: torch.dtype = getattr(torch, name)
    return value
