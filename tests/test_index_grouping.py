"""Grouping by index: for parents that share an ancestor (the clients of one Flower round), neuron j of
every parent makes fused neuron j, whatever the parents' order."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedfuse import FusionConfig, fuse
from tests.permutation import permuted_copy


def children(seed: int) -> tuple[nn.Sequential, nn.Sequential, torch.Tensor]:
    """Two parents whose neuron j differ, and where k-means would pair parent 0's neuron j with another
    of parent 1's: the second is the first with its hidden neurons shuffled and a little noise."""
    torch.manual_seed(seed)
    first = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    calibration = torch.randn(200, 6)
    second = permuted_copy(first, seed=seed + 1, example=calibration)
    with torch.no_grad():
        for parameter in second.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    return first, second, calibration


def mixes(point: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``point`` is a positive mix of ``a`` and ``b`` (to round-off); the shares need not sum to
    one, since each neuron is rescaled to its group's mean scale."""
    members = torch.stack([a, b], dim=1)
    shares = torch.linalg.lstsq(members, point[:, None]).solution.flatten()
    return bool((shares > 0).all()) and torch.allclose(members @ shares, point, atol=1e-5)


def test_index_grouping_makes_fused_neuron_j_from_neuron_j_of_every_parent() -> None:
    first, second, calibration = children(0)
    config = FusionConfig(grouping="index", ridge=1e6)  # fits all but the prior: the aligned average
    fused = fuse([first, second], calibration, config).model
    rows = [fused[0].weight[j].detach() for j in range(12)]
    assert all(mixes(rows[j], first[0].weight[j].detach(), second[0].weight[j].detach()) for j in range(12))
    matched = fuse([first, second], calibration, FusionConfig(ridge=1e6)).model  # k-means pairs otherwise
    assert not all(
        mixes(matched[0].weight[j].detach(), first[0].weight[j].detach(), second[0].weight[j].detach())
        for j in range(12)
    )


def test_index_grouping_does_not_depend_on_the_parents_order() -> None:
    first, second, calibration = children(1)
    third = copy.deepcopy(first)
    with torch.no_grad():
        for parameter in third.parameters():
            parameter.mul_(1.05)
    config = FusionConfig(grouping="index")
    one = fuse([first, second, third], calibration, config).model
    other = fuse([third, first, second], calibration, config).model
    with torch.no_grad():
        torch.testing.assert_close(one(calibration), other(calibration), rtol=0, atol=1e-6)


def test_index_grouping_refuses_a_width_it_cannot_keep() -> None:
    with pytest.raises(ValueError, match=r"grouping='index' keeps the parents' width .* width_multiplier=2"):
        FusionConfig(grouping="index", width_multiplier=2)
