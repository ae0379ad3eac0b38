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


def permuted_resnet_copy(model: nn.Module, seed: int) -> nn.Module:
    """A zoo ResNet with every residual stream and every block's inner channels shuffled consistently:
    the stem and projection blocks shuffle their stream; identity blocks keep the stream's order on
    both sides of the addition, as a residual stream must."""
    generator = torch.Generator().manual_seed(seed)
    permuted = copy.deepcopy(model)

    def shuffle(channels: int) -> torch.Tensor:
        return torch.randperm(channels, generator=generator)

    with torch.no_grad():
        stream = shuffle(permuted.stem[0].out_channels)
        _permute_outputs(permuted.stem[0], permuted.stem[1], stream)
        for block in permuted.blocks:
            inner = shuffle(block.conv1.out_channels)
            block.conv1.weight.copy_(block.conv1.weight[:, stream])
            _permute_outputs(block.conv1, block.bn1, inner)
            block.conv2.weight.copy_(block.conv2.weight[:, inner])
            if block.projects:
                projection, norm = block.shortcut[0], block.shortcut[1]
                projection.weight.copy_(projection.weight[:, stream])
                stream = shuffle(block.conv2.out_channels)
                _permute_outputs(projection, norm, stream)
            _permute_outputs(block.conv2, block.bn2, stream)
        head = permuted.head[-1]
        head.weight.copy_(head.weight[:, stream])
    return permuted


def permuted_vit_copy(model: nn.Module, seed: int) -> nn.Module:
    """A zoo ViT with its residual stream's dimensions, and every MLP's hidden units, shuffled."""
    generator = torch.Generator().manual_seed(seed)
    permuted = copy.deepcopy(model)
    embed = permuted.embed
    stream = torch.randperm(embed.projection.out_channels, generator=generator)
    with torch.no_grad():
        embed.projection.weight.copy_(embed.projection.weight[stream])
        embed.projection.bias.copy_(embed.projection.bias[stream])
        embed.cls_token.copy_(embed.cls_token[..., stream])
        embed.position.copy_(embed.position[..., stream])
        for block in permuted.blocks:
            for norm in (block.norm1, block.norm2):
                norm.weight.copy_(norm.weight[stream])
                norm.bias.copy_(norm.bias[stream])
            attention = block.attention
            attention.qkv.weight.copy_(attention.qkv.weight[:, stream])
            attention.out.weight.copy_(attention.out.weight[stream])
            attention.out.bias.copy_(attention.out.bias[stream])
            first, second = block.mlp[0], block.mlp[2]
            hidden = torch.randperm(first.out_features, generator=generator)
            first.weight.copy_(first.weight[hidden][:, stream])
            first.bias.copy_(first.bias[hidden])
            second.weight.copy_(second.weight[stream][:, hidden])
            second.bias.copy_(second.bias[stream])
        norm, head = permuted.head[0], permuted.head[-1]
        norm.weight.copy_(norm.weight[stream])
        norm.bias.copy_(norm.bias[stream])
        head.weight.copy_(head.weight[:, stream])
    return permuted


def _permute_outputs(conv: nn.Conv2d, norm: nn.BatchNorm2d, order: torch.Tensor) -> None:
    conv.weight.copy_(conv.weight[order])
    for tensor in (norm.weight, norm.bias, norm.running_mean, norm.running_var):
        tensor.copy_(tensor[order])
