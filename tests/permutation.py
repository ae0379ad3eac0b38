"""Test helper: a copy of a sequential model with its hidden neurons shuffled, computing the same function."""

from __future__ import annotations

import copy

import torch
from torch import nn

from fedfuse.fusion.levels import find_levels


def permuted_copy(model: nn.Sequential, seed: int) -> nn.Sequential:
    """Shuffle the neurons of every level but the output one (and its BatchNorm), and the next level's
    inputs to match, so the copy computes exactly the model's function with its neurons reordered."""
    generator = torch.Generator().manual_seed(seed)
    permuted = copy.deepcopy(model)
    leaves, levels = find_levels(permuted)
    with torch.no_grad():
        for level, following in zip(levels, levels[1:]):
            order = torch.randperm(level.width, generator=generator)
            layer = leaves.module(level.name)
            layer.weight.copy_(layer.weight[order])
            if layer.bias is not None:
                layer.bias.copy_(layer.bias[order])
            if level.norm:
                norm = leaves.module(level.norm)
                for tensor in (norm.weight, norm.bias, norm.running_mean, norm.running_var):
                    tensor.copy_(tensor[order])
            _permute_inputs(leaves.module(following.name), order)
    return permuted


def _permute_inputs(layer: nn.Module, order: torch.Tensor) -> None:
    weight = layer.weight
    channels = len(order)
    grouped = weight.view(weight.shape[0], channels, -1)  # a Linear after Flatten sees channel blocks
    weight.copy_(grouped[:, order].reshape(weight.shape))
