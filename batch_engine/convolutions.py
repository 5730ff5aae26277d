"""The vision encoder's convolutions whose kernel covers their whole input, as the one matrix product each is.

GLM-4V's encoder embeds each patch with a `Conv3d` whose kernel and stride are the patch (3 channels × 2 frames ×
14 × 14 pixels in, one position out) and merges each 2 × 2 of patches with a `Conv2d` of kernel and stride 2: each
output is one dot product of the whole input with a filter, so each call is a matrix product of (inputs,
the input's values) by (the values, filters). cuDNN ran the two as convolution kernels of 0.98 ms for a 1024×1024
image on an H100, 0.85 of it the patch embedding, a product of about 20 GFLOP; as products the encoder took 24.1 ms
against 24.5 on another H100, then 24.6 against 24.5 and 24.6 against 25.3 in two more runs (`bench/gpu_parts.py`,
`bench/RESULTS.md`): about 0.3 ms on balance, within what separates runs.

`products_for_convolutions` puts a `ConvolutionProduct` in each such convolution's place in the encoder, holding the
same weight and bias (its parameters as they were, flattened at each call). A call whose input is not one kernel's
size (no caller of the encoder makes one) runs the convolution as before.
"""

from __future__ import annotations

import functools
from typing import Any


def products_for_convolutions(model: Any) -> int:
    """Replace every `Conv2d` and `Conv3d` of `model`'s vision encoder (`model.model.visual`) whose kernel equals its
    stride, without padding, dilation or groups, by a `ConvolutionProduct`; how many were replaced (0 for a model
    without such an encoder)."""
    import torch

    visual = getattr(getattr(model, "model", None), "visual", None)
    if visual is None:
        return 0
    product_class = _product_class()
    replaced = 0
    for parent in list(visual.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (torch.nn.Conv2d, torch.nn.Conv3d) and _whole_kernel(child):
                setattr(parent, name, product_class(child))
                replaced += 1
    return replaced


def _whole_kernel(convolution: Any) -> bool:
    dims = len(convolution.kernel_size)
    return (
        tuple(convolution.stride) == tuple(convolution.kernel_size)
        and tuple(convolution.padding) == (0,) * dims
        and tuple(convolution.dilation) == (1,) * dims
        and convolution.groups == 1
    )


@functools.cache
def _product_class() -> type[Any]:
    """The module, defined on first use so that importing this module does not import torch."""
    import torch
    from torch.nn import functional

    class ConvolutionProduct(torch.nn.Module):
        """A convolution whose kernel is its stride, as one matrix product where the input is one kernel's size
        (module docstring). Returns what the convolution returns: (inputs, filters, 1, …)."""

        def __init__(self, convolution: Any) -> None:
            super().__init__()
            self.kernel = tuple(convolution.kernel_size)
            self.weight, self.bias = convolution.weight, convolution.bias
            """The convolution's own: (filters, channels, *kernel), (filters,) or None."""
            self.convolve = functional.conv2d if len(self.kernel) == 2 else functional.conv3d

        def forward(self, inputs: Any) -> Any:
            if tuple(inputs.shape[2:]) != self.kernel:
                return self.convolve(inputs, self.weight, self.bias, stride=self.kernel)
            values = self.weight[0].numel()
            product = functional.linear(inputs.reshape(len(inputs), values), self.weight.reshape(-1, values), self.bias)
            return product.view(*product.shape, *(1 for _ in self.kernel))

        def extra_repr(self) -> str:
            return f"{tuple(self.weight.shape)}, kernel={self.kernel}"

    return ConvolutionProduct
