"""Modules with per-channel parameters that their output is affine in, fitted in closed form: the scale
and shift of a LayerNorm, GroupNorm or InstanceNorm, the slopes of a PReLU.

Such a module computes, for channel c, y_c = h_c(u) + Σ_m θ_cm · g_cm(u): a LayerNorm's γ_c multiplies the
normalised input and β_c is added; a PReLU's slope a_c multiplies min(0, u_c) beside max(0, u_c). With
the fused model's own input u, the fit of θ_c to the group targets is a least-squares problem of m
unknowns per channel, pulled toward the members' share-weighted parameters (the aligned average) like
every level (`fedfuse.fusion.fitting.solve_channels`). The features g and the offset h are read off the
module itself (a copy), run with its parameters set to zeros and ones, so no formula is written
twice. The normalisation statistics are the fused model's own: a fused GroupNorm
normalises its groups of fused channels, which are put in the order of the reference parent's
neurons (`fedfuse.fusion.targets`), so a parent's groups stay whole when the parents agree. A shared
parameter (a PReLU's one slope) is one problem over every channel.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from fedfuse.fusion.statistics import rows_of


def parameter_features(module: nn.Module, inputs: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    """What ``module`` adds on ``inputs`` without its parameters, and per unit of each.

    Returns:
        offset ``[rows, C]``: its output with every parameter 0, neurons along ``axis`` as columns;
        features ``[rows, C, m]``: for each of its m parameters (in `named_parameters` order), the output
        with that parameter 1 and the others 0, minus the offset.
    """
    probe = copy.deepcopy(module)  # the module itself, its parameters set to zeros and ones in turn
    parameters = list(probe.parameters())
    with torch.no_grad():
        for value in parameters:
            value.zero_()
        offset = probe(inputs)
        features = []
        for value in parameters:
            value.fill_(1)
            features.append(rows_of(probe(inputs) - offset, axis))
            value.zero_()
    return rows_of(offset, axis), torch.stack(features, dim=-1)


def aligned_parameters(modules: list[nn.Module], shares: Tensor) -> Tensor:
    """The prior, ``[m, C]`` (``[m, 1]`` shared): each fused channel's parameters, the share-weighted mix
    of its group members' (``shares`` ``[K·n, C]``, the grouping's); a shared parameter, the parents'
    values weighted by their shares in all groups."""
    shares = shares.double().cpu()
    rows = []
    for values in zip(*(module.parameters() for module in modules), strict=True):
        stacked = [value.detach().double().cpu().flatten() for value in values]
        if stacked[0].numel() == 1:
            weights = shares.sum(1).view(len(modules), -1).sum(1)
            rows.append((torch.cat(stacked) @ weights / weights.sum()).reshape(1))
        else:
            rows.append(torch.cat(stacked) @ shares)
    return torch.stack(rows)


def shared(module: nn.Module) -> bool:
    """Whether every parameter is one value for all channels (a PReLU's one slope): one problem then."""
    return all(value.numel() == 1 for value in module.parameters())


def write_parameters(module: nn.Module, solution: Tensor) -> None:
    """Write the fitted ``[m, C]`` (or ``[m, 1]``) parameters, row i the i-th of `named_parameters`."""
    with torch.no_grad():
        for row, value in zip(solution, module.parameters(), strict=True):
            value.copy_(row.reshape(value.shape))
