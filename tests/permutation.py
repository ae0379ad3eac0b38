"""Test helpers: copies of a model with their hidden neurons shuffled, computing the same function."""

from __future__ import annotations

import copy

import torch
from torch import nn

from fedfuse.fusion.levels import LevelPlan, plan_levels


def permuted_copy(model: nn.Module, seed: int, example: torch.Tensor | tuple) -> nn.Module:
    """Shuffle the neurons of every free space of a traced model whose levels are all layers: the outputs
    of every layer (and BatchNorm) writing into a space, and the inputs of every layer reading from it
    (a block of positions per channel after a flatten). The copy must compute the model's function exactly,
    which this checks on ``example``: a space the plan got wrong would break it."""
    inputs = example[0] if isinstance(example, tuple) else example
    plan = plan_levels(copy.deepcopy(model).eval(), inputs[:8])
    generator = torch.Generator().manual_seed(seed)
    orders = {
        name: _order(space.width, _norm_groups(model, plan, name), generator)
        for name, space in plan.spaces.items()
        if not space.fixed
    }
    permuted = copy.deepcopy(model)
    with torch.no_grad():
        for level in plan.levels:
            if level.kind == "per_channel":  # its per-channel parameters (and statistics) follow the channels
                if level.space in orders:
                    module = permuted.get_submodule(level.modules[0])
                    for value in (*module.parameters(), *module.buffers()):
                        if value.numel() > 1:
                            value.copy_(value[orders[level.space]])
                continue
            layer = permuted.get_submodule(level.layer)
            if level.space in orders and level.kind == "embedding":  # its neurons are its columns
                layer.weight.copy_(layer.weight[:, orders[level.space]])
            elif level.space in orders:
                order = orders[level.space]
                layer.weight.copy_(layer.weight[order])
                if layer.bias is not None:
                    layer.bias.copy_(layer.bias[order])
                if level.norm:
                    norm = permuted.get_submodule(level.norm)
                    for tensor in (norm.weight, norm.bias, norm.running_mean, norm.running_var):
                        if tensor is not None:
                            tensor.copy_(tensor[order])
            if level.concatenated:  # each part's channels shuffled in their own place
                parts, offset = [], 0
                for part, width in level.concatenated:
                    parts.append((orders[part] if part in orders else torch.arange(width)) + offset)
                    offset += width
                _permute_inputs(layer, torch.cat(parts))
            elif level.source in orders and not level.channelwise:  # a depthwise filter reads its own channel
                _permute_inputs(layer, orders[level.source])
        model.eval(), permuted.eval()
        assert torch.allclose(permuted(inputs), model(inputs), atol=1e-5, rtol=1e-4), (
            "the permutation changed the function"
        )
    return permuted


def _norm_groups(model: nn.Module, plan: LevelPlan, space: str) -> int:
    """How many groups of neighbouring channels a GroupNorm in ``space`` normalises together (1: none)."""
    groups = [
        model.get_submodule(level.modules[0]).num_groups
        for level in plan.levels
        if level.space == space and isinstance(model.get_submodule(level.modules[0]), nn.GroupNorm)
    ]
    return groups[0] if groups else 1


def _order(width: int, groups: int, generator: torch.Generator) -> torch.Tensor:
    """A random order of ``width`` channels that keeps ``groups`` blocks of neighbours together (a
    GroupNorm's groups, shuffled, each shuffled within): the permutations a GroupNorm allows."""
    if groups == 1:
        return torch.randperm(width, generator=generator)
    size = width // groups
    blocks = torch.randperm(groups, generator=generator)
    return torch.cat([block * size + torch.randperm(size, generator=generator) for block in blocks])


def _permute_inputs(layer: nn.Module, order: torch.Tensor) -> None:
    weight = layer.weight
    grouped = weight.view(weight.shape[0], len(order), -1)  # a Linear after a flatten sees channel blocks
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
