"""The prior a level's fit is pulled toward: the parents' own weights, aligned by the groupings.

A fused neuron stands for its group's members; its input channels stand for the groups of the previous
level. So the members' weights, re-indexed through the previous level's grouping (each parent's input
channels summed into the fused channel they went to) and averaged with the group's shares, give weights
that compute the group target from the fused inputs as far as the members agree. At the first level
every parent reads the same input, and this aligned average reproduces the group target exactly.

Fitting by least squares pulled toward that prior (ridge toward it, not toward zero) keeps the parents'
knowledge in the directions the calibration set does not span, so the fused weights stay the size of the
parents' (a next round of training does not diverge), and the fused first layer no longer lies in the
span of the calibration inputs (which a minimum-norm or ridge-to-zero solution would reveal).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from fedfuse.fusion.clustering import mix
from fedfuse.fusion.levels import Level

if TYPE_CHECKING:
    from fedfuse.fusion.context import FusionContext
    from fedfuse.fusion.targets import SpaceGrouping


def folded_weights(parent: nn.Module, layer: str, norm: str | None) -> Tensor:
    """A parent's layer as its closed-form map: ``[n, fan_in (+1)]``, one row per neuron, inputs in the
    order of ``weight.flatten(1)``, the bias last when the map has one; a folded BatchNorm (eval mode)
    is multiplied in."""
    module = parent.get_submodule(layer)
    if isinstance(module, nn.Embedding):  # neuron d's weights are column d, one per token id
        return module.weight.detach().double().T.contiguous()
    weight = module.weight.detach().double().flatten(1)
    bias = module.bias.detach().double() if module.bias is not None else None
    if norm is not None:
        batchnorm = parent.get_submodule(norm)
        scale = (batchnorm.running_var.double() + batchnorm.eps).rsqrt()
        shift = -batchnorm.running_mean.double() * scale
        if batchnorm.affine:
            scale, shift = (
                scale * batchnorm.weight.detach().double(),
                shift * batchnorm.weight.detach().double(),
            )
            shift = shift + batchnorm.bias.detach().double()
        weight = weight * scale[:, None]
        bias = shift if bias is None else bias * scale + shift
    return weight if bias is None else torch.cat([weight, bias[:, None]], dim=1)


def assignments(grouping: SpaceGrouping, parents: int) -> tuple[list[Tensor], list[Tensor]]:
    """Per parent, the fused group each of its neurons went to (``[n]`` each; every neuron is a member of
    exactly one group) and the factor that turns the fused channel into that neuron's scale (its scale
    over its group target's, ``[n]`` each)."""
    group = grouping.unit_shares.argmax(dim=1)
    factor = grouping.scales / grouping.group_scales[group]
    return list(group.reshape(parents, -1)), list(factor.reshape(parents, -1))


def aligned_average(
    weights: Sequence[Tensor],
    shares: Tensor,
    inputs: tuple[Sequence[Tensor], Sequence[Tensor]] | None,
    input_groups: int,
    with_bias: bool,
    channelwise: bool = False,
) -> Tensor:
    """The group members' weights, re-indexed to the fused inputs and mixed by the group shares.

    Args:
        weights: per parent ``[n, fan_in (+1)]`` (`folded_weights`), fan_in = channels · positions.
        shares: ``[K·n, g]`` the level's grouping (T = Z·shares).
        inputs: per parent, the fused input group of each of its input channels and the factor from
            the fused channel to the parent's (`assignments`); None when the inputs keep their index (the
            model's input, a fixed space). A parent channel c that went to fused channel h reads about
            factor_c times what h carries, so its weight column moves to h multiplied by factor_c.
        input_groups: the fused level's input channels.
        with_bias: the last column of each weight is a bias (never re-indexed).
        channelwise: neuron c reads input channel c alone (a depthwise convolution, ``[n, taps (+1)]``):
            its input went to the fused channel it goes to itself, so its filter is only scaled.

    Returns:
        ``[fan_in' (+1), g]``: the prior in the layout of the closed-form solution (one column per
        fused neuron), fan_in' = input_groups · positions.
    """
    prior: Tensor | None = None  # mixed parent by parent: never all K·n re-indexed rows at once
    for k, weight in enumerate(weights):
        bias = weight[:, -1:] if with_bias else weight[:, :0]
        matrix = weight[:, :-1] if with_bias else weight
        if inputs is not None and channelwise:
            matrix = matrix * inputs[1][k].to(matrix)[:, None]
        elif inputs is not None:
            groups, factors = inputs[0][k].to(matrix.device), inputs[1][k].to(matrix)
            blocks = matrix.reshape(matrix.shape[0], len(groups), -1) * factors[None, :, None]
            summed = blocks.new_zeros(matrix.shape[0], input_groups, blocks.shape[2])
            summed.index_add_(1, groups, blocks)
            matrix = summed.flatten(1)
        aligned = torch.cat([matrix, bias], dim=1)  # [n, fan_in' (+1)]
        rows = slice(k * len(weight), (k + 1) * len(weight))
        part = mix(shares[rows].to(aligned.device), aligned)
        prior = part if prior is None else prior + part
    assert prior is not None
    return prior.T


def weight_norm(weights: Tensor, with_bias: bool) -> float:
    """The Frobenius norm of a map's weights (its bias left out)."""
    return float((weights[:, :-1] if with_bias else weights).norm())


def aligned_prior(
    level: Level, grouping: SpaceGrouping, parent_maps: list[Tensor], context: FusionContext, with_bias: bool
) -> Tensor | None:
    """A level's prior for the fused model: the `aligned_average` of its group members' maps
    (``parent_maps``, `folded_weights` of every parent), re-indexed through the grouping of the space its
    inputs come from; None for a fit pulled toward zero (``prior="zero"``, or inputs whose channels
    cannot be traced back)."""
    if context.config.prior == "zero":
        return None
    if level.concatenated:
        inputs, input_groups = _concatenated_assignments(level, context)
    elif level.source == "?":
        return None
    elif level.source is None:  # the model's input, or channels that keep their index
        inputs, input_groups = None, 0
    else:
        source = context.groupings[level.source]
        inputs, input_groups = assignments(source, len(context.parents)), context.groups(level.source)
    prior = aligned_average(
        parent_maps, grouping.shares, inputs, input_groups, with_bias, channelwise=level.channelwise
    )
    return prior.to(context.device)


def _concatenated_assignments(
    level: Level, context: FusionContext
) -> tuple[tuple[list[Tensor], list[Tensor]], int]:
    """`assignments` for an input that concatenates several spaces along the channels: each part's,
    shifted past the fused channels of the parts before it (a part that keeps its index maps to itself)."""
    parents = len(context.parents)
    groups: list[list[Tensor]] = [[] for _ in range(parents)]
    factors: list[list[Tensor]] = [[] for _ in range(parents)]
    offset = 0
    for space, width in level.concatenated:
        if space is None:
            part = ([torch.arange(width)] * parents, [torch.ones(width, dtype=torch.float64)] * parents)
            fused = width
        else:
            part, fused = assignments(context.groupings[space], parents), context.groups(space)
        for k in range(parents):
            groups[k].append(part[0][k].cpu() + offset)
            factors[k].append(part[1][k].cpu().double())
        offset += fused
    return ([torch.cat(g) for g in groups], [torch.cat(f) for f in factors]), offset
