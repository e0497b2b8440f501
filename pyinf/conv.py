"""Convolutions as linear layers over patches.

An ``nn.Conv1d`` or ``nn.Conv2d`` with ``groups=1`` computes, at each output position,
``y = W p + b`` with ``W`` its weight flattened to ``[out_channels, in_channels x kernel]``
and ``p`` the input patch under the kernel, unfolded channel-major as ``F.unfold`` orders it
(the order of the flattened weight). It is a linear layer whose tokens are the output
positions: a document's weight gradient is ``sum_positions g p^T``, the structure every
pyinf kernel takes, and its EK-FAC factors are those of that layer (kronfluence treats
Conv2d the same way). A grouped convolution (depthwise: Mamba's, ConvNeXt's) has one such
layer per group, with no cross-group blocks: it is not tracked.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._padding import padded_empty


def is_patch_conv(module: nn.Module) -> bool:
    """A convolution pyinf tracks as a linear layer over patches: a Conv1d / Conv2d with
    groups=1 that computes what its attributes say (a subclass with a forward of its own,
    as timm's Conv2dSame padding by itself, would be read with other patches than it uses)."""
    return (isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1
            and type(module).forward in (nn.Conv1d.forward, nn.Conv2d.forward) and "forward" not in module.__dict__)


def is_convolution(module: nn.Module) -> bool:
    """Any convolution (transposed, grouped, 3-D included): those pyinf does not track are named."""
    return isinstance(module, nn.modules.conv._ConvNd)


def weight_shape(module: nn.Module) -> Tuple[int, int]:
    """``(d_out, d_in)`` of the flattened weight, the bias column not counted."""
    out_channels, in_channels, *kernel = module.weight.shape
    size = 1
    for k in kernel:
        size *= k
    return out_channels, in_channels * size


def patches(module: nn.Module, x: torch.Tensor, ones: bool = False) -> torch.Tensor:
    """The input patches of a batch, ``[B, positions, in_channels x kernel]``, in the order of
    the output positions (row-major, as the output flattens); ``ones``: with the bias's ones
    column, rows padded as :func:`pyinf.capture._append_ones` pads them (written once: the
    patch matrix is kernel-size times the input, so a second copy is what costs)."""
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        padding = module.padding  # symmetric: unfold pads, no padded copy of the input
    else:  # "same" (possibly one more on one side) or reflect / replicate / circular padding
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * len(module.kernel_size)
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if isinstance(module, nn.Conv1d):  # [B, C, L] as an image of one row
        x = x.unsqueeze(2)
        kernel, stride, dilation, padding = ((1, *kernel), (1, *stride), (1, *dilation), (0, *padding))
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [B, C x kernel, positions]
    if not ones:
        return cols.transpose(1, 2).contiguous()
    b, d, positions = cols.shape
    out = padded_empty(b, positions, d + 1, dtype=cols.dtype, device=cols.device)
    out[..., :d] = cols.transpose(1, 2)
    out[..., d] = 1
    return out


def positions(grad_out: torch.Tensor) -> torch.Tensor:
    """The output gradient ``[B, out_channels, *spatial]`` as ``[B, positions, out_channels]``."""
    return grad_out.flatten(2).transpose(1, 2).contiguous()
