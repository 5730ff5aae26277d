"""Greedy choice as `generate` makes it, on the device, for the batching engine's rows (`batch_engine.steps`): under
the checkpoint's `suppress_tokens` and `repetition_penalty` (over each row's prompt and its answer so far), and the
ids that end an answer (`stop_ids_of`)."""

from __future__ import annotations

from typing import Any


class GreedyChoice:
    """A greedy token per row from its logits, keeping for each slot the tokens it has seen when the checkpoint
    penalises repetition."""

    def __init__(self, generation_config: Any, slots: int, vocab: int, device: Any) -> None:
        import torch

        self.suppressed = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.suppressed[list(generation_config.suppress_tokens or [])] = True
        self.penalty = float(generation_config.repetition_penalty or 1.0)
        self.seen = torch.zeros((slots, vocab) if self.penalty != 1.0 else (slots, 1), dtype=torch.bool, device=device)
        """Per slot, the tokens of its prompt and answer (one column, unused, without a penalty)."""

    def start(self, row: int, ids: Any) -> None:
        """Row `row` begins a prompt of `ids`."""
        self.seen[row] = False
        if self.penalty != 1.0:
            self.seen[row, ids] = True

    def __call__(self, logits: Any, rows: Any) -> Any:
        """The token each of `rows` chooses from its `logits` (a row each), now seen by it."""
        import torch

        scores = logits.float()
        if self.penalty != 1.0:
            penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
            scores = torch.where(self.seen[rows], penalised, scores)
        scores = scores.masked_fill(self.suppressed, float("-inf"))
        chosen = scores.argmax(-1)
        if self.penalty != 1.0:
            self.seen[rows, chosen] = True
        return chosen


def stop_ids_of(generation_config: Any) -> tuple[int, ...]:
    """The token ids that end an answer in a checkpoint's generation config (`eos_token_id`: one id or a list)."""
    ids = generation_config.eos_token_id
    if ids is None:
        return ()
    return tuple(int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids]))
