"""k-means on the leading principal components (`FusionConfig.grouping_variance`)."""

from __future__ import annotations

import pytest
import torch

from fedfuse import FusionConfig
from fedfuse.fusion.clustering import principal_components, projection_pays


def _cost(points: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor, groups: int) -> float:
    totals = torch.zeros(groups, dtype=points.dtype).index_add_(0, labels, weights)
    sums = torch.zeros(groups, points.shape[1], dtype=points.dtype).index_add_(
        0, labels, points * weights[:, None]
    )
    centres = sums / totals[:, None]
    return float((weights * (points - centres[labels]).square().sum(1)).sum())


def test_any_groupings_cost_moves_by_at_most_the_variance_left_out() -> None:
    generator = torch.Generator().manual_seed(0)
    # Anisotropic points, like neuron values: a few strong directions and a long weak tail.
    points = torch.randn(600, 80, dtype=torch.float64, generator=generator) * torch.logspace(1, -2, 80)
    weights = torch.rand(600, dtype=torch.float64, generator=generator) + 0.5
    projected = principal_components(points, weights, 0.99)
    assert projected.shape[1] < 40
    mean = weights @ points / weights.sum()
    spread = float((weights * (points - mean).square().sum(1)).sum())
    for seed in range(5):
        labels = torch.randint(0, 12, (600,), generator=torch.Generator().manual_seed(seed))
        full, reduced = _cost(points, weights, labels, 12), _cost(projected, weights, labels, 12)
        assert reduced <= full + 1e-9
        assert full - reduced <= 0.01 * spread


@pytest.mark.parametrize(("count", "dims"), [(300, 50), (50, 300)])  # axes from the spread, from the Gram
def test_points_of_low_rank_keep_every_distance(count: int, dims: int) -> None:
    generator = torch.Generator().manual_seed(1)
    points = torch.randn(count, 5, dtype=torch.float64, generator=generator) @ torch.randn(
        5, dims, dtype=torch.float64, generator=generator
    )
    weights = torch.rand(count, dtype=torch.float64, generator=generator)
    weights[3] = 0.0  # a neuron of no importance is still placed
    projected = principal_components(points, weights, 0.999999)
    assert projected.shape == (count, 5)
    exact = "donot_use_mm_for_euclid_dist"
    assert torch.allclose(
        torch.cdist(projected, projected, compute_mode=exact), torch.cdist(points, points, compute_mode=exact)
    )


def test_the_projection_is_used_where_it_saves_work() -> None:
    assert projection_pays(points=2048, dims=400, groups=256)  # eight MLPs' hidden layer
    assert not projection_pays(points=512, dims=2048, groups=64)  # eight ResNets' stream in a wide sketch


def test_a_share_of_one_keeps_the_points() -> None:
    points = torch.randn(50, 7)
    assert principal_components(points, torch.ones(50), 1.0) is points


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5, "all"])
def test_a_share_outside_zero_to_one_is_refused(share: object) -> None:
    with pytest.raises(ValueError, match="grouping_variance must be in"):
        FusionConfig(grouping_variance=share)  # type: ignore[arg-type]
