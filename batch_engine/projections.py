"""One matrix product for each attention layer's query, key and value projections (`EngineSettings.fuse_projections`).

A decode step reads every weight once, so its time is the bytes it reads and the kernels it launches. GLM's key and
value projections are small (4096 → 256: 2 MB each in bfloat16) and, as products of their own, read at a tenth of
the device's bandwidth and each add a split-K reduction; with the query projection they are one product of
4096 → 4608 that reads at the bandwidth of a large one. So at start the engine concatenates each layer's three
weights (and biases) into one `FusedProjections` module in `q_proj`'s place; `k_proj` and `v_proj` become
`ProjectionPart`s that hand out their share of the product `q_proj` just computed. The attention's own `forward`
(transformers', unchanged) calls the three in that order on the same hidden states; a part called on other input
computes its own share instead, so the answer never depends on the order. The weights are the same numbers, held
once (the three modules they were in are released).
"""

from __future__ import annotations

import functools
from typing import Any


def fuse_projections(decoder: Any) -> int:
    """Fuse the query, key and value projections of every layer of `decoder` (a transformers text model) whose
    attention has three `Linear` ones over the same input; how many layers were fused."""
    import torch

    fused_class, part_class = _classes()
    fused = 0
    for layer in decoder.layers:
        attention: Any = getattr(layer, "self_attn", None)
        projections: list[Any] = [getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj")]
        if not all(type(p) is torch.nn.Linear for p in projections):
            continue
        query, key, value = projections
        same_input = query.in_features == key.in_features == value.in_features
        if not same_input or len({p.bias is None for p in projections}) != 1:
            continue
        source = fused_class(query, key, value)
        attention.q_proj, attention.k_proj, attention.v_proj = source, part_class(source, 1), part_class(source, 2)
        fused += 1
    return fused


def fused_class() -> type[Any]:
    """The class of the fused projections (`FusedProjections`)."""
    return _classes()[0]


@functools.cache
def _classes() -> tuple[type, type]:
    """The two modules, defined on first use so that importing this module does not import torch."""
    import torch
    from torch.nn import functional

    class FusedProjections(torch.nn.Module):
        """The three projections as one product; returns the query's share and keeps the key's and value's for
        the parts (module docstring)."""

        def __init__(self, query: Any, key: Any, value: Any) -> None:
            super().__init__()
            with torch.no_grad():
                weight = torch.cat([query.weight, key.weight, value.weight])
                bias = None if query.bias is None else torch.cat([query.bias, key.bias, value.bias])
            self.weight = torch.nn.Parameter(weight, requires_grad=False)
            self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
            self.sizes = (query.out_features, key.out_features, value.out_features)
            self.product: Any = functional.linear
            """How the product is computed (`batch_engine.skinny_linear.use_kernel` sets its own)."""
            self.kept: tuple[Any, ...] | None = None
            """(the input, the key's share, the value's share) of the last call, until the value's part reads it."""

        def forward(self, hidden: Any) -> Any:
            product = self.product(hidden, self.weight, self.bias)
            query, key, value = product.split(self.sizes, dim=-1)
            self.kept = (hidden, key, value)
            return query

        def share(self, index: int, hidden: Any) -> Any:
            """Projection `index` (1: key, 2: value) of `hidden`: what the last call kept when it was on the same
            input, else its own product."""
            kept = self.kept
            if index == len(self.sizes) - 1:
                self.kept = None  # the last reader: hold no activations past the layer
            if kept is not None and kept[0] is hidden:
                return kept[index]
            start = sum(self.sizes[:index])
            rows = slice(start, start + self.sizes[index])
            return self.product(hidden, self.weight[rows], None if self.bias is None else self.bias[rows])

    class ProjectionPart(torch.nn.Module):
        """The key's or the value's projection, served from `FusedProjections` (module docstring)."""

        def __init__(self, source: Any, index: int) -> None:
            super().__init__()
            self.index = index
            self._source = (source,)  # not a submodule: the weights are `q_proj`'s, listed once

        def forward(self, hidden: Any) -> Any:
            return self._source[0].share(self.index, hidden)

    return FusedProjections, ProjectionPart
