"""A fused model wider or narrower than its parents.

k-means can make any number of groups from a space's K·n parent neurons, so the fused space need not
have n neurons: with K parents, a wider fused space keeps more of what distinguishes them (K·n groups
would keep every parent neuron), a narrower one compresses (K = 1 then distils one model into a smaller
one). This resizes the free spaces of a copy of parent 0 (every layer writing into a space, and every
layer reading from it, with its positions per channel); fusion then fits every weight, so the resized
layers' initial values do not matter. Fixed spaces (the classes) keep their width. State_dict keys stay,
shapes change.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedfuse.fusion.levels import LevelPlan, plan_levels


def resize_spaces(
    model: nn.Module, plan: LevelPlan, multiplier: float, seed: int, example: Tensor
) -> LevelPlan:
    """Give every free space round(multiplier · width) neurons (at least 1), in place; return the resized
    model's plan.

    New layers are initialised from ``seed`` (fusion overwrites them; a fresh gradient-variant start
    uses them).

    Raises:
        ValueError: the model declares its levels or has blocks (`LevelPlan.resizable`), or its forward
            hard-codes a size that the resizing changes (checked by running it).
    """
    plan.check("gradient", multiplier)
    widths = {
        name: space.width if space.fixed else max(1, round(space.width * multiplier))
        for name, space in plan.spaces.items()
    }
    parameter = next(model.parameters())
    with torch.no_grad():
        expected = model(example).shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for level in plan.levels:
            assert level.layer is not None
            # Inputs from the model's input or through an operation without a rule (fixed spaces) stay.
            inputs = widths[level.source] * level.positions if level.source in widths else None
            layer = _resized(model.get_submodule(level.layer), widths[level.space], inputs)
            model.set_submodule(level.layer, layer.to(parameter.device, parameter.dtype))
            if level.norm:
                norm = model.get_submodule(level.norm)
                resized = type(norm)(
                    widths[level.space], norm.eps, norm.momentum, norm.affine, norm.track_running_stats
                )
                model.set_submodule(level.norm, resized.to(parameter.device, parameter.dtype))
    try:
        with torch.no_grad():
            produced = model(example).shape
    except RuntimeError as error:
        raise ValueError(
            f"the model's forward does not run at the new width ({error}); keep width_multiplier 1"
        ) from error
    if produced != expected:
        raise ValueError(
            f"at the new width the model outputs {tuple(produced)}, not {tuple(expected)}: its forward "
            "hard-codes a size (e.g. x.view(-1, 400)); use x.flatten(1) there, or keep width_multiplier 1"
        )
    return plan_levels(model, example)


def _resized(layer: nn.Module, width: int, inputs: int | None) -> nn.Module:
    """``layer`` with ``width`` outputs and ``inputs`` inputs (None: unchanged)."""
    bias = layer.bias is not None
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return type(layer)(
            inputs or layer.in_channels,
            width,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            bias=bias,
            padding_mode=layer.padding_mode,
        )
    return nn.Linear(inputs or layer.in_features, width, bias=bias)
