"""A fused model wider or narrower than its parents.

k-means can make any number of groups from a level's K·n parent neurons, so the fused level need not
have n neurons: with K parents, a wider fused level keeps more of what distinguishes them (K·n groups
would keep every parent neuron), a narrower one compresses. This resizes the hidden levels of a copy of
parent 0 (an ``nn.Sequential`` chain); fusion then fits every weight, so the resized layers' initial
values do not matter. The output layer keeps its classes. State_dict keys stay, shapes change.
"""

from __future__ import annotations

import torch
from torch import nn

from fedfuse.fusion.levels import find_levels


def resize_hidden_levels(model: nn.Module, multiplier: float, seed: int) -> list[int]:
    """Give every hidden level round(multiplier · width) neurons (at least 1), in place.

    Returns the new width of every level, the output layer's unchanged. New layers are initialised from
    ``seed`` (their values are overwritten by fusion, but a fresh gradient-variant start uses them).

    Raises:
        ValueError: ``model`` is not an ``nn.Sequential`` chain of Linear/Conv2d levels.
    """
    try:
        leaves, levels = find_levels(model)
    except TypeError as error:
        raise ValueError(f"width_multiplier resizes nn.Sequential chains only: {error}") from None
    parameter = next(model.parameters())
    widths = [max(1, round(level.width * multiplier)) for level in levels[:-1]] + [levels[-1].width]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        previous: tuple[int, int] | None = None  # the previous level's (original, new) width
        for level, width in zip(levels, widths):
            layer = _resized(leaves.module(level.name), width, previous)
            model.set_submodule(level.name, layer.to(parameter.device, parameter.dtype))
            if level.norm:
                norm = leaves.module(level.norm)
                resized_norm = type(norm)(
                    width, norm.eps, norm.momentum, norm.affine, norm.track_running_stats
                )
                model.set_submodule(level.norm, resized_norm.to(parameter.device, parameter.dtype))
            previous = (level.width, width)
    return widths


def _resized(layer: nn.Module, width: int, previous: tuple[int, int] | None) -> nn.Module:
    """``layer`` with ``width`` outputs, and inputs resized like the previous level's outputs (a Linear
    after a Flatten takes one block of positions per channel)."""
    bias = layer.bias is not None
    if isinstance(layer, nn.Conv2d):
        return nn.Conv2d(
            previous[1] if previous else layer.in_channels,
            width,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            bias=bias,
            padding_mode=layer.padding_mode,
        )
    in_features = layer.in_features if previous is None else layer.in_features // previous[0] * previous[1]
    return nn.Linear(in_features, width, bias=bias)
