"""A prefill's images (`batch_engine.steps`): the vision encoder launched for them, its output kept per content key
(`DeviceSteps.encoder`) and placed over the prompt's image placeholders, without waiting on the device, so that the
text model's launches queue behind the encoder's instead of starting from an idle device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batch_engine.encoder_graphs import EncoderGraphs
    from batch_engine.prompts import Prompt
    from batch_engine.stores import ByteBoundStore


def place_images(
    embeds: Any, prompt: Prompt, model: Any, store: ByteBoundStore, graphs: EncoderGraphs | None = None
) -> None:
    """The encoder's output for `prompt`'s images (`encode_images`) over their placeholder tokens in `embeds` (a
    prefill from position 0), found on the host: selecting them with a mask on the device would wait for the encoder
    to finish (the mask's count is read back)."""
    placeholders = prompt.ids.cpu() == model.config.image_token_id
    where = placeholders.nonzero()[:, 0].to(model.device, non_blocking=True)
    embeds.index_copy_(0, where, encode_images(prompt, model, store, graphs).to(embeds.dtype))


def encode_images(prompt: Prompt, model: Any, store: ByteBoundStore | None, graphs: EncoderGraphs | None = None) -> Any:
    """The encoder's output for `prompt`'s images, one row per image token, every image's in order: found in `store`
    under the prompt's `encoder_key`, or launched (and kept there). The encoder is called as transformers'
    `get_image_features` calls it, less its split into images (it reads the grid back from the device, waiting for
    the whole encoder) and with the grid's positions, bounds and longest image computed on the host (on the device
    they are read back too): for one image (the `glm` codec's only case) nothing waits on the device; several still
    wait in `packed_attention`'s split. The pixels' copy, where the codec left them on the host, is staged and may
    wait for work queued before it. With `graphs` (`DeviceSteps.encoder_graphs`), the encoder's CUDA graph for the
    image's grid replays where it has one."""
    key = prompt.encoder_key
    found = store.lookup(key) if key and store is not None else None
    if found is not None:
        return found.tensor
    visual, grid, device = model.model.visual, prompt.grid.cpu(), model.device
    embeds = graphs.encode(prompt.pixel_values, grid) if graphs is not None else None
    if embeds is None:
        pixels = prompt.pixel_values.to(device, visual.dtype, non_blocking=True)
        embeds = visual(pixels, **encoder_inputs(grid, visual, device)).pooler_output
    if key and store is not None:
        store.keep(key, StoredOutput(embeds))
    return embeds


def encoder_inputs(grid: Any, visual: Any, device: Any) -> dict[str, Any]:
    """The vision encoder `visual`'s inputs on `device` besides the pixels, all of them fixed by the images' `grid`
    (on the host): the grid, the patches' positions, the images' bounds among them and the longest image's patches,
    the last two computed on the host (`encode_images`)."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

    bounds = get_vision_cu_seqlens(grid)
    return {
        "grid_thw": grid.to(device, non_blocking=True),
        "position_ids": get_vision_position_ids(grid, visual.spatial_merge_size).to(device, non_blocking=True),
        "cu_seqlens": bounds.to(device, non_blocking=True),
        "max_seqlen": int(bounds.diff().max()),
    }


@dataclass(frozen=True)
class StoredOutput:
    """An encoder output as `DeviceSteps.encoder` keeps it, sized by its bytes."""

    tensor: Any

    @property
    def nbytes(self) -> int:
        return int(self.tensor.nbytes)
