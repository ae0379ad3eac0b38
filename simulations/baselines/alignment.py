"""Neurons re-indexed between models of one architecture: the step every alignment-based merge shares.

Git Re-Basin and OT fusion both express each client model in a reference model's neuron order before
averaging; they differ only in how they find the map. Here a map is given per *space* of the model's
traced `LevelPlan` (`fedfuse.fusion.levels`): a level's neurons and, for a residual stream, every level
writing into it share one map, so the network's function is kept exactly when the map is a permutation.
A map ``Q`` (``[n, n]``, rows summing to 1) makes the aligned model's neuron ``a`` the mix ``Σ_b Q[a, b]``
of the model's neurons ``b``: a permutation is one 1 per row; a transport plan scaled by n is a soft map.
Fixed spaces (the classes) keep their index.

Only traced plans whose levels are all Linear/Conv layers are aligned: a block (attention, LayerNorm)
has parameters whose neuron axes the plan does not name, and a grouped convolution mixes channels in
groups; both are refused with the level's name.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedfuse.fusion.levels import Level, LevelPlan, plan_levels


@dataclass(frozen=True)
class AlignedLayer:
    """One level's parameters with their neuron axes explicit, in float64.

    Attributes:
        level: the level.
        weight: ``[n, channels_in, per_channel]``: rows are the level's neurons, the middle axis the
            channels of the space its input comes from (the model's input: one "channel" per input
            feature group, never re-indexed), the last the kernel positions or flattened positions.
        vectors: ``[n, m]``: the bias and the folded BatchNorm's affine parameters, one column each.
    """

    level: Level
    weight: Tensor
    vectors: Tensor


def alignable_plan(model: nn.Module, example: Tensor, method: str) -> LevelPlan:
    """The traced `LevelPlan` of ``model``, checked to be one whose neurons can be re-indexed.

    Raises:
        ValueError: naming ``method`` and the first level it cannot re-index (a block, a layer whose
            input channels cannot be traced back, a grouped convolution).
    """
    plan = plan_levels(copy.deepcopy(model).eval(), example)
    for level in plan.levels:
        reason = None
        if not level.closed_form:
            reason = f"it is a {level.kind} ({level.reason})"
        elif level.kind == "embedding":
            reason = "it is an embedding"
        elif level.concatenated:
            reason = "its input concatenates the channels of several levels"
        elif level.source == "?":
            reason = "its input channels cannot be traced back to a level"
        elif level.source == level.space:
            reason = "it reads the space it writes"
        elif getattr(model.get_submodule(level.layer), "groups", 1) != 1:
            reason = "it is a grouped convolution"
        if reason is not None:
            raise ValueError(
                f"{method} re-indexes the neurons of Linear/Conv levels; {type(model).__name__} has "
                f"level {level.name!r} it cannot handle: {reason}"
            )
    return plan


def free_spaces(plan: LevelPlan) -> list[str]:
    """The spaces whose neurons may be re-indexed (all but the fixed ones: the classes), in fit order."""
    return [name for name, space in plan.spaces.items() if not space.fixed]


def layers_of(model: nn.Module, plan: LevelPlan) -> list[AlignedLayer]:
    """Every level of ``model`` as an `AlignedLayer`, in the plan's order."""
    layers = []
    for level in plan.levels:
        module = model.get_submodule(level.layer)
        weight = module.weight.detach().double()
        channels = plan.spaces[level.source].width if level.source is not None else 1
        columns = [module.bias] if module.bias is not None else []
        if level.norm is not None:
            norm = model.get_submodule(level.norm)
            columns += [t for t in (norm.weight, norm.bias) if t is not None]
        vectors = (
            torch.stack([c.detach().double() for c in columns], dim=1)
            if columns
            else weight.new_zeros(weight.shape[0], 0)
        )
        layers.append(AlignedLayer(level, weight.reshape(weight.shape[0], channels, -1), vectors))
    return layers


def map_layer(layer: AlignedLayer, maps: Mapping[str, Tensor]) -> AlignedLayer:
    """``layer`` with its neurons mixed by its space's map and its input channels by its source's."""
    weight, vectors = layer.weight, layer.vectors
    out = maps.get(layer.level.space)
    if out is not None:
        weight, vectors = torch.einsum("ab,bcp->acp", out, weight), out @ vectors
    source = maps.get(layer.level.source) if layer.level.source is not None else None
    if source is not None:
        weight = torch.einsum("dc,acp->adp", source, weight)
    return AlignedLayer(layer.level, weight, vectors)


def aligned_model(model: nn.Module, plan: LevelPlan, maps: Mapping[str, Tensor]) -> nn.Module:
    """A copy of ``model`` whose neurons in each space of ``maps`` are re-indexed (mixed) by that map.

    Every tensor with a neuron axis moves: a layer's weight rows and bias, its input columns (a block of
    positions per channel after a flatten), and the folded BatchNorm's parameters and running statistics.
    With permutation maps the copy computes ``model``'s function exactly.

    Args:
        model: the model (not modified).
        plan: its plan (`alignable_plan`).
        maps: space name → ``[n, n]`` float map; spaces left out keep their order.
    """
    aligned = copy.deepcopy(model)
    with torch.no_grad():
        for level in plan.levels:
            module = aligned.get_submodule(level.layer)
            out = maps.get(level.space)
            source = maps.get(level.source) if level.source is not None else None
            weight = module.weight.double()
            shape = weight.shape
            weight = weight.reshape(shape[0], source.shape[0] if source is not None else 1, -1)
            if source is not None:
                weight = torch.einsum("dc,acp->adp", source.double(), weight)
            if out is not None:
                weight = torch.einsum("ab,bcp->acp", out.double(), weight)
            module.weight.copy_(weight.reshape(shape))
            if out is None:
                continue
            tensors = [module.bias]
            if level.norm is not None:
                norm = aligned.get_submodule(level.norm)
                tensors += [norm.weight, norm.bias, norm.running_mean, norm.running_var]
            for tensor in tensors:
                if tensor is not None:
                    tensor.copy_(out.to(tensor.dtype) @ tensor)
    return aligned


def permutation_matrix(order: Tensor) -> Tensor:
    """The ``[n, n]`` float64 map taking neuron ``order[a]`` to position ``a``."""
    matrix = torch.zeros(len(order), len(order), dtype=torch.float64)
    matrix[torch.arange(len(order)), order] = 1.0
    return matrix
