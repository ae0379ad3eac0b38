"""Grouping that ignores what a ReLU network's neurons are free to choose: their scale."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from fedfuse import fuse


def rescaled(model: nn.Sequential, seed: int) -> nn.Sequential:
    """The same function with every hidden ReLU neuron scaled by its own positive factor (its weights and
    bias up, the next layer's input weights down): a ReLU network's positive-scale symmetry."""
    generator = torch.Generator().manual_seed(seed)
    copy_ = copy.deepcopy(model)
    layers = [module for module in copy_ if isinstance(module, nn.Linear)]
    with torch.no_grad():
        for layer, following in zip(layers, layers[1:]):
            factor = torch.exp(torch.randn(layer.out_features, generator=generator) * 1.5)
            layer.weight.mul_(factor[:, None])
            layer.bias.mul_(factor)
            following.weight.div_(factor[None, :])
    return copy_


def test_rescaling_a_parents_neurons_changes_no_grouping() -> None:
    """Fusing A with B, or A with B's neurons rescaled (the same function), groups the neurons alike: they
    are grouped by the direction of their values, not their size, so the grouping costs are the same and
    the fused models predict alike (their fits differ only by how the ridge weighs the differently scaled
    fused neurons). Grouped by raw values, B's largest neurons would take groups of their own."""
    torch.manual_seed(0)
    a, b = (
        nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
        for _ in range(2)
    )
    b_rescaled = rescaled(b, seed=1)
    x = torch.randn(400, 10)
    with torch.no_grad():
        torch.testing.assert_close(b_rescaled(x), b(x), rtol=1e-4, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = fuse([a, b], x)
        scaled = fuse([a, b_rescaled], x)
    for one, other in zip(plain.report.levels, scaled.report.levels):
        assert one.grouping_cost == pytest.approx(other.grouping_cost, abs=1e-6)
    held_out = torch.randn(500, 10)
    with torch.no_grad():
        agree = (scaled.model(held_out).argmax(1) == plain.model(held_out).argmax(1)).float().mean()
    assert agree > 0.85
