"""The engine's own operators (`torch.library.custom_op`, named `batch_engine::…`): each is one opaque node to
`torch.compile`, so that the compiled layer or block around it stays one graph. Used by `decode_attention`,
`skinny_linear`, `slots` and `vision_attention`. Importing this imports no torch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def define_operator(name: str, schema: str, body: Callable[..., Any], shape: Callable[..., Any]) -> None:
    """Define `batch_engine::{name}` with `schema`, running `body`; to the compiler its result is a new tensor of
    `shape(*arguments)`, in the first argument's dtype and on its device. Once per process (a second definition of
    a name fails): its callers define it where they first load what it runs."""
    import torch

    operator = torch.library.custom_op(f"batch_engine::{name}", body, mutates_args=(), schema=schema)
    operator.register_fake(lambda first, *rest: first.new_empty(shape(first, *rest)))
