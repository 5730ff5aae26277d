"""What the batching engine (`batch_engine.engine`) takes and gives: the caller's errors for what it refuses, a
request's completion, and the engine's counters."""

from __future__ import annotations

from dataclasses import dataclass

from stage_protocol.errors import Unavailable


@dataclass(frozen=True)
class Refusals:
    """The caller's own errors for what the engine refuses: a prompt with no room in a slot (`rejected`), and a full
    queue, a closed engine or a failed step (`unavailable`); `settings` is the prefix of the settings that size the
    engine (`ORCH_VISION__ENGINE`), which messages name."""

    rejected: type[Exception]
    unavailable: type[Unavailable]
    settings: str = ""

    def setting(self, suffix: str) -> str:
        """The setting `ENGINE<suffix>` (`_SLOTS`, `_MAX_TOKENS`; "" for the engine itself), or the engine's own
        field name without a settings prefix."""
        return f"{self.settings}{suffix}" if self.settings else f"its {suffix.removeprefix('_').lower() or 'kind'}"


PLAIN_REFUSALS = Refusals(ValueError, Unavailable)
"""Without a stage's own errors: `ValueError` and `stage_protocol.errors.Unavailable`."""


@dataclass(frozen=True)
class Completion:
    """What one request generated, and how it went."""

    ids: list[int]
    """The new token ids, a final stop token included."""
    prompt_tokens: int
    reused_tokens: int
    """Prompt tokens whose KV came from the prefix store (not prefilled)."""
    queue_ms: float
    first_token_ms: float
    """From `submit` to the first token."""
    looped: bool


@dataclass(frozen=True)
class EngineStats:
    """What the engine has done: decode steps (`ridden` of them inside a prefill's forward: `EngineSettings.ride_along`)
    and their mean batch size, requests admitted and their mean wait for
    a slot, lookups of the prefix and encoder stores, the vision encoder's runs replayed as a CUDA graph of their grid
    (`batch_engine.encoder_graphs`; 0 where the prefills do not replay theirs), and the times dynamo reached its
    recompile limit in this process (`batch_engine.compiling.recompile_limit_hits`; 0 without compiled layers)."""

    running: int
    waiting: int
    steps: int
    mean_batch: float
    admitted: int
    mean_queue_ms: float
    prefix_hits: int
    prefix_misses: int
    encoder_hits: int
    recompile_limit_hits: int = 0
    ridden: int = 0
    encoder_replays: int = 0
