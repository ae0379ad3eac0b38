"""Modules with per-channel parameters that their output is affine in, fitted in closed form: the scale
and shift of a LayerNorm, GroupNorm, InstanceNorm or a BatchNorm that follows no layer (eval mode), the
slopes of a PReLU.

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
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedfuse.fusion.batchnorm import renormalize_batchnorms
from fedfuse.fusion.statistics import rows_of


def standardise(module: nn.Module, run: Callable[[], None]) -> None:
    """Set a BatchNorm's running statistics to those of its input over ``run()`` (the fused model's own),
    so that its scale and shift act on standardised channels, as each member's do on its own: the
    members' parameters are then comparable, and their mix is the prior. Other modules normalise by
    what they see (a LayerNorm) or not at all (a PReLU): nothing to set."""
    if isinstance(module, _BatchNorm):
        renormalize_batchnorms([module], run)


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


def _aligned_parameters(modules: list[nn.Module], shares: Tensor) -> Tensor:
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


def aligned(modules: list[nn.Module], shares: Tensor, fused: nn.Module) -> Tensor:
    """`_aligned_parameters`, where a BatchNorm's are first made comparable: each member's scale and shift
    act on its input standardised by its own running statistics, so they are turned into the affine map
    of its input they are (a·u + c), mixed as that, and put back in the units of the ``fused`` module's
    statistics (`standardise`): exact for members that agree, whatever their statistics."""
    if not isinstance(fused, _BatchNorm):
        return _aligned_parameters(modules, shares)
    maps = [_affine_map(module) for module in modules]
    slope, intercept = (torch.cat(part) @ shares.double().cpu() for part in zip(*maps, strict=True))
    mean, scale = _statistics(fused)
    return torch.stack([slope * scale, intercept + slope * mean])


def _affine_map(norm: nn.Module) -> tuple[Tensor, Tensor]:
    """An eval-mode BatchNorm as the per-channel affine map of its input it computes: (a, c), y = a·u + c."""
    mean, scale = _statistics(norm)
    slope = norm.weight.detach().double().cpu() / scale
    return slope, norm.bias.detach().double().cpu() - slope * mean


def _statistics(norm: nn.Module) -> tuple[Tensor, Tensor]:
    """A BatchNorm's running mean and √(variance + ε), in float64 on the CPU."""
    assert isinstance(norm, _BatchNorm) and norm.running_mean is not None and norm.running_var is not None
    variance = norm.running_var.detach().double().cpu()
    return norm.running_mean.detach().double().cpu(), (variance + norm.eps).sqrt()


def shared(module: nn.Module) -> bool:
    """Whether every parameter is one value for all channels (a PReLU's one slope): one problem then."""
    return all(value.numel() == 1 for value in module.parameters())


def write_parameters(module: nn.Module, solution: Tensor) -> None:
    """Write the fitted ``[m, C]`` (or ``[m, 1]``) parameters, row i the i-th of `named_parameters`."""
    with torch.no_grad():
        for row, value in zip(solution, module.parameters(), strict=True):
            value.copy_(row.reshape(value.shape))
