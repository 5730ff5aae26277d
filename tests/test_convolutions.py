"""The vision encoder's whole-kernel convolutions as matrix products (`batch_engine.convolutions`): the same outputs
as the convolutions, in the encoder and alone; the convolution itself where an input is not one kernel's size; only
convolutions whose kernel is their stride replaced; and the engine's answers for images equal to plain `generate`'s
on the model as transformers builds it."""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from batch_engine.convolutions import products_for_convolutions
from batch_engine.engine import BatchEngine
from batch_engine.settings import EngineSettings
from tests.vision_engine import BUDGET, image
from vision_stage.glm_engine import REFUSALS, GlmEngine
from vision_stage.types import VisionRequest


class _Convolutions(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Counts the convolutions that run while it is on (`aten.conv2d`, `aten.conv3d`, `aten.convolution`, …)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += bool(re.fullmatch(r"_?conv(\dd|olution)", func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def _image_features(model: Any, pixels: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The encoder's output for the images of `grid`, and how many convolutions it ran."""
    with torch.inference_mode(), _Convolutions() as convolutions:
        output = model.model.get_image_features(pixels, image_grid_thw=grid, return_dict=True)
    return torch.cat(tuple(output.pooler_output)), convolutions.count


def _with_encoder(visual: torch.nn.Module) -> SimpleNamespace:
    """What `products_for_convolutions` reads of a model: `model.model.visual`."""
    return SimpleNamespace(model=SimpleNamespace(visual=visual))


def test_the_encoder_s_patch_embedding_and_merge_become_products_with_the_same_output(glm: GlmEngine) -> None:
    model: Any = copy.deepcopy(glm.model)
    config = model.config.vision_config
    grid = torch.tensor([[1, 8, 6], [1, 4, 4]])  # two images: the encoder packs them
    values = config.in_channels * config.temporal_patch_size * config.patch_size**2
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randn((int(grid.prod(dim=1).sum()), values), generator=generator)
    visual = model.model.visual
    with torch.no_grad():  # the tiny model's biases are zeros: a product that dropped them would pass
        for bias in (visual.patch_embed.proj.bias, visual.downsample.bias):
            bias.copy_(torch.randn(bias.shape, generator=generator))
    convolved, convolutions = _image_features(model, pixels, grid)
    assert convolutions == 2

    assert products_for_convolutions(model) == 2
    assert type(visual.patch_embed.proj).__name__ == type(visual.downsample).__name__ == "ConvolutionProduct"
    produced, convolutions = _image_features(model, pixels, grid)
    assert convolutions == 0, "the products ran, not the convolutions"
    torch.testing.assert_close(produced, convolved, rtol=1e-5, atol=1e-6)
    assert products_for_convolutions(model) == 0, "nothing left to replace"


@pytest.mark.parametrize("dims", [2, 3])
def test_a_product_answers_as_its_convolution_for_one_kernel_and_convolves_anything_else(dims: int) -> None:
    generator = torch.Generator().manual_seed(dims)
    kind = torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d
    convolution = kind(3, 5, kernel_size=2, stride=2)
    product = copy.deepcopy(convolution)
    holder = torch.nn.Sequential(product)
    assert products_for_convolutions(_with_encoder(holder)) == 1
    for side, batch, convolutions in ((2, 4, 0), (6, 4, 1), (2, 0, 0)):  # one kernel; three a side; no input
        inputs = torch.randn((batch, 3, *(side,) * dims), generator=generator)
        with torch.no_grad(), _Convolutions() as ran:
            produced = holder[0](inputs)
        assert ran.count == convolutions
        with torch.no_grad():
            torch.testing.assert_close(produced, convolution(inputs), rtol=1e-5, atol=1e-6)


def test_only_convolutions_whose_kernel_is_their_stride_are_replaced() -> None:
    kept = [
        torch.nn.Conv2d(3, 5, kernel_size=2, stride=1),
        torch.nn.Conv2d(3, 5, kernel_size=2, stride=2, padding=1),
        torch.nn.Conv2d(4, 4, kernel_size=2, stride=2, groups=2),
        torch.nn.Conv2d(3, 5, kernel_size=2, stride=2, dilation=2),
    ]
    holder = torch.nn.Sequential(*kept)
    assert products_for_convolutions(_with_encoder(holder)) == 0
    assert list(holder) == kept
    assert products_for_convolutions(object()) == 0, "a model without a vision encoder"


def test_the_engine_s_answers_equal_plain_generate_on_the_encoder_transformers_built(glm: GlmEngine) -> None:
    served: Any = copy.deepcopy(glm.model)  # the module's model stays as transformers built it, for the other tests
    plain = GlmEngine(copy.deepcopy(served), glm.codec, name="plain")
    encoded = glm.codec.encode(VisionRequest(image(5), "what is the total?", task="answer"), thinking=False)
    expected = plain.generate_ids(encoded, BUDGET)
    batch = BatchEngine(served, EngineSettings(slots=2, max_tokens=256), REFUSALS)
    assert type(served.model.visual.patch_embed.proj).__name__ == "ConvolutionProduct"
    original: Any = plain.model
    assert type(original.model.visual.patch_embed.proj) is torch.nn.Conv3d
    future = batch.submit(encoded.inputs, image_key="five", max_new_tokens=BUDGET)
    batch.run_until_idle()
    assert future.result().ids == expected
