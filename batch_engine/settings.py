"""The batching engine's settings (`EngineSettings`, validated), and how both the orchestrator's `vision` settings
and the vision stage's command line name them (`EngineOptions`, read by `engine_settings`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class EngineSettings:
    slots: int = 16
    """Requests decoded together at most."""
    max_tokens: int = 8192
    """Prompt plus answer per request at most (each slot's length)."""
    queue_size: int = 64
    """Requests waiting for a slot at most; beyond that `submit` refuses."""
    prefill_tokens: int = 8192
    """Prompt tokens prefilled per step at most (one request is always admitted, however long)."""
    prefix_bytes: int = 4 << 30
    """Bytes of image-prefix KV kept for follow-up questions."""
    encoder_bytes: int = 512 << 20
    """Bytes of vision-encoder output kept."""
    cuda_graphs: bool = True
    """Capture decode steps as CUDA graphs (on a CUDA device only)."""
    stop_loops: bool = True
    """End an answer once it loops (`stage_protocol.loops`), as the `glm` backend's plain `generate` does."""
    compile: bool | None = None
    """`torch.compile` the text model's decoder layers (dynamic shapes; one compilation serves every layer): fuses
    the many small kernels of a decode step, at about a minute more to start on a GPU. None: on a CUDA device."""

    def __post_init__(self) -> None:
        bounds = (
            ("slots", self.slots, 1, 128),
            ("max_tokens", self.max_tokens, 256, None),
            ("queue_size", self.queue_size, 1, None),
            ("prefill_tokens", self.prefill_tokens, 1, None),
            ("prefix_bytes", self.prefix_bytes, 0, None),
            ("encoder_bytes", self.encoder_bytes, 0, None),
        )
        for name, value, low, high in bounds:
            if value < low or (high is not None and value > high):
                within = f"from {low} to {high}" if high is not None else f"at least {low}"
                raise ValueError(f"the batching engine's {name} must be {within}, not {value}")


class EngineOptions(Protocol):
    """The engine's options as the orchestrator's `vision` settings (`ORCH_VISION__ENGINE…`) and the vision stage's
    command line (`--engine…`) both name them."""

    @property
    def engine(self) -> str: ...  # `batched` or `generate`
    @property
    def engine_slots(self) -> int: ...
    @property
    def engine_max_tokens(self) -> int: ...
    @property
    def engine_queue(self) -> int: ...
    @property
    def engine_prefix_mb(self) -> int: ...
    @property
    def engine_cuda_graphs(self) -> bool: ...
    @property
    def engine_compile(self) -> str: ...  # `auto`, `on` or `off`
    @property
    def engine_prefill_tokens(self) -> int: ...


def engine_settings(options: EngineOptions) -> EngineSettings | None:
    """The batching engine's settings from `options`; None for plain `generate`."""
    if options.engine == "generate":
        return None
    return EngineSettings(
        slots=options.engine_slots,
        max_tokens=options.engine_max_tokens,
        queue_size=options.engine_queue,
        prefix_bytes=options.engine_prefix_mb << 20,
        cuda_graphs=options.engine_cuda_graphs,
        compile={"auto": None, "on": True, "off": False}[options.engine_compile],
        prefill_tokens=options.engine_prefill_tokens,
    )
