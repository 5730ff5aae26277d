"""What a request is to the engine's device side: its model inputs (`Prompt`, built by `prompt_of`), and the keys
under which its prompt's prefix KV and its image's encoder output are kept and found again (`reuse_keys` for an image
prompt, `text_prefixes` for a text one). Built once per request, on the submitter's thread (`batch_engine.engine`)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

TEXT_BLOCK = 32
"""A text prompt's prefixes are kept and found at multiples of this many tokens."""


@dataclass(frozen=True)
class Prompt:
    """One request's model inputs, on the CPU: token ids (prompt tokens,), positions (axes, prompt tokens) and the
    M-RoPE delta (0 without M-RoPE), the image's pixel values and grid (None without an image), and its content key
    (None: never reused)."""

    ids: Any
    positions: Any
    delta: int
    pixel_values: Any
    grid: Any
    image_key: bytes | None
    prefixes: tuple[tuple[bytes, int], ...] = ()
    """The prefixes whose KV may be reused or kept, longest first: their key and length (`reuse_keys`,
    `text_prefixes`); empty: nothing to reuse or keep."""
    encoder_key: bytes | None = None
    """What its image's encoder output is stored under; None: not kept."""

    @property
    def tokens(self) -> int:
        return int(self.ids.shape[0])


def prompt_of(
    inputs: Mapping[str, Any], image_key: str | None, *, rope_index: Callable[..., Any] | None, image_end_id: int | None
) -> Prompt:
    """One prompt (the processor's or the tokenizer's output) as the engine runs it: its positions (M-RoPE's from the
    model's own `get_rope_index`, given as `rope_index`; without it 0, 1, …) and its reuse keys."""
    import torch

    ids = inputs["input_ids"][0]
    if rope_index is not None:
        positions, delta = rope_index(
            inputs["input_ids"],
            inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
            attention_mask=None,
        )
        positions, delta = positions[:, 0], int(delta.reshape(-1)[0])
    else:
        positions, delta = torch.arange(int(ids.shape[0])).view(1, -1), 0
    key, grid = (image_key.encode() if image_key else None), inputs.get("image_grid_thw")
    if inputs.get("pixel_values") is None:
        prefixes, encoder_key = text_prefixes(ids), None
    else:
        prefixes, encoder_key = reuse_keys(ids, key, grid, image_end_id)
    return Prompt(
        ids=ids,
        positions=positions,
        delta=delta,
        pixel_values=inputs.get("pixel_values"),
        grid=grid,
        image_key=key,
        prefixes=prefixes,
        encoder_key=encoder_key,
    )


def reuse_keys(
    ids: Any, image_key: bytes | None, grid: Any, image_end_id: int | None
) -> tuple[tuple[tuple[bytes, int], ...], bytes | None]:
    """An image prompt's prefix (its tokens up to the image's end token, keyed with the image's content hash and
    grid; none when the prefix is the whole prompt) and its encoder key. Computed once per request, on the
    submitter's thread."""
    if image_key is None or grid is None or image_end_id is None:
        return (), None
    shape = str(grid.tolist()).encode()
    encoder_key = hashlib.sha256(image_key + shape).digest()
    ends = (ids == image_end_id).nonzero()
    length = int(ends[-1, 0]) + 1 if ends.numel() else 0
    if not length or length >= int(ids.shape[0]):
        return (), encoder_key
    digest = hashlib.sha256(image_key)
    digest.update(ids[:length].numpy().tobytes())
    digest.update(shape)
    return ((digest.digest(), length),), encoder_key


def text_prefixes(ids: Any) -> tuple[tuple[bytes, int], ...]:
    """A prompt without an image: its prefixes at every multiple of `TEXT_BLOCK` tokens short of the whole prompt,
    longest first, each keyed by the hash of its token ids (a follow-up sharing the instructions and the description
    shares the prefixes up to its question)."""
    raw = ids.cpu().numpy().astype("int64").tobytes()
    digest = hashlib.sha256(b"text prefix")
    keys = []
    for end in range(TEXT_BLOCK, int(ids.shape[0]), TEXT_BLOCK):
        digest.update(raw[(end - TEXT_BLOCK) * 8 : end * 8])
        keys.append((digest.copy().digest(), end))
    return tuple(reversed(keys))
