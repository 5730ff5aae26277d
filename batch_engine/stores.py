"""What the batching engine keeps beside its slots (`batch_engine.steps`), by content key and bounded in bytes
(`cachetools`): the vision encoder's output per image (`ByteBoundStore`), and the KV of prompt prefixes
(`PrefixStore`), found again by any of a prompt's prefixes; `StoredKV.first` is a kept prefix's shorter part, without
a copy. Only the engine's thread touches them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cachetools import LRUCache

if TYPE_CHECKING:
    import torch

    from batch_engine.prompts import Prompt


@dataclass(frozen=True)
class StoredKV:
    """The K and V of one prefix: (layers, kv heads, tokens, head dim) each."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.keys.shape[2])

    def first(self, tokens: int) -> StoredKV:
        """The KV of the first `tokens` tokens (views, no copy)."""
        return StoredKV(self.keys[:, :, :tokens], self.values[:, :, :tokens])

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.values.nbytes)


def _nbytes(entry: Any) -> int:
    return int(entry.nbytes)


class ByteBoundStore(LRUCache[bytes, Any]):
    """An LRU map from a content key to tensors, bounded by their bytes; an entry larger than the bound is not
    kept."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(maxsize=max(1, max_bytes), getsizeof=_nbytes)
        self.hits = 0
        self.misses = 0

    def lookup(self, key: bytes) -> Any | None:
        found = self.get(key)
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def keep(self, key: bytes, entry: Any) -> None:
        if _nbytes(entry) <= self.maxsize:
            self[key] = entry


class PrefixStore(ByteBoundStore):
    """Prefix KV, each under the key of the longest prefix it was kept for, and each of its shorter prefixes' keys
    (those a prompt lists, `Prompt.prefixes`) indexed to it."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes)
        self.index: LRUCache[bytes, tuple[bytes, int]] = LRUCache(maxsize=1 << 16)
        """Each kept prefix's key, and those of its shorter prefixes, to (the entry holding it, its length)."""

    def find(self, prompt: Prompt) -> StoredKV | None:
        """The longest of `prompt`'s prefixes whose KV is kept (a view of it), if any."""
        for key, tokens in prompt.prefixes:
            held = self.index.get(key)
            entry: StoredKV | None = self.get(held[0]) if held is not None else None
            if entry is not None:
                self.hits += 1
                return entry if entry.tokens == tokens else entry.first(tokens)
        if prompt.prefixes:
            self.misses += 1
        return None

    def keep_longest(self, prompt: Prompt, cache: Any, row: int, reused: StoredKV | None) -> None:
        """Keep the KV of `prompt`'s longest prefix from `row` of `cache` (the slots', `batch_engine.slots`), found
        under each of its prefixes' keys; nothing when the `reused` one was as long."""
        if not prompt.prefixes:
            return
        key, length = prompt.prefixes[0]
        if reused is not None and reused.tokens >= length:
            return
        self.keep(key, StoredKV(cache.keys[:, row, :, :length].clone(), cache.values[:, row, :, :length].clone()))
        for shorter, tokens in prompt.prefixes:
            self.index[shorter] = (key, tokens)

    def clear(self) -> None:
        super().clear()
        self.index.clear()
