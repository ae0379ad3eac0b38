"""Importance-weighted k-means (`fedfuse.fusion.kmeans`): scikit-learn's algorithm, in torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from fedfuse.fusion import kmeans
from fedfuse.fusion.kmeans import weighted_kmeans


def _blobs(clusters: int, per_cluster: int, dims: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dims, generator=generator) * 10
    labels = torch.arange(clusters).repeat_interleave(per_cluster)
    return centres[labels] + torch.randn(len(labels), dims, generator=generator), labels


def test_well_separated_blobs_are_found_exactly() -> None:
    points, truth = _blobs(clusters=12, per_cluster=30, dims=20, seed=0)
    found = weighted_kmeans(points, torch.ones(len(points)), 12, seed=0)
    # Same partition: every true cluster maps to one found cluster, and no two share one.
    pairs = set(zip(truth.tolist(), found.labels.tolist()))
    assert len(pairs) == 12 and len({label for _, label in pairs}) == 12


def test_centres_are_the_weighted_means_of_their_members() -> None:
    points, _ = _blobs(clusters=4, per_cluster=25, dims=5, seed=1)
    weights = torch.linspace(0.1, 3.0, len(points))
    found = weighted_kmeans(points, weights, 4, seed=0)
    for cluster in range(4):
        members = found.labels == cluster
        mean = (points[members] * weights[members, None]).sum(0) / weights[members].sum()
        assert torch.allclose(found.centres[cluster], mean, atol=1e-4)
    nearest = torch.cdist(points, found.centres).square().min(dim=1)
    assert torch.equal(nearest.indices, found.labels)
    assert found.inertia == pytest.approx(float((nearest.values * weights).sum()), rel=1e-4)


def test_a_heavy_point_draws_its_centre_to_itself() -> None:
    points = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    found = weighted_kmeans(points, torch.tensor([1.0, 1000.0, 1.0, 1.0]), 2, seed=0)
    assert found.centres.min().item() == pytest.approx(1000 / 1001, rel=1e-5)


def test_same_seed_same_clustering_and_seeds_matter() -> None:
    points = torch.randn(600, 30, generator=torch.Generator().manual_seed(2))
    weights = torch.ones(600)
    first, again, other = (weighted_kmeans(points, weights, 40, seed=seed) for seed in (0, 0, 1))
    assert torch.equal(first.labels, again.labels) and torch.equal(first.centres, again.centres)
    assert not torch.equal(first.labels, other.labels)


@pytest.mark.parametrize("seed", range(4))
def test_the_cost_is_no_worse_than_scikit_learns_on_unstructured_points(seed: int) -> None:
    """The same algorithm with other random draws: on points with no clusters to find (where starts matter
    most), the weighted cost is within a few percent of scikit-learn's."""
    generator = torch.Generator().manual_seed(seed)
    points = torch.randn(1024, 64, generator=generator)
    weights = torch.rand(1024, generator=generator) + 0.5
    ours = weighted_kmeans(points, weights, 128, seed=seed).inertia
    theirs = (
        KMeans(128, n_init=1, random_state=seed).fit(points.numpy(), sample_weight=weights.numpy()).inertia_
    )
    assert ours < theirs * 1.03


def test_fewer_distinct_points_than_clusters_still_gives_valid_labels() -> None:
    """Dead neurons are identical zeros: once every distinct point is a centre, further draws are free."""
    points = torch.cat([torch.zeros(20, 3), torch.eye(3)])
    found = weighted_kmeans(points, torch.ones(23), 6, seed=0)
    assert found.labels.min() >= 0 and found.labels.max() < 6
    assert found.inertia == pytest.approx(0.0, abs=1e-6)


def test_a_given_start_is_where_lloyd_begins() -> None:
    points = torch.tensor([[0.0], [0.1], [5.0], [5.1], [9.0]])
    found = weighted_kmeans(points, torch.ones(5), 2, seed=0, start=torch.tensor([[0.0], [9.0]]), max_iter=1)
    assert found.iterations == 1
    assert np.allclose(found.centres.flatten().numpy(), [0.05, (5.0 + 5.1 + 9.0) / 3])


def test_more_clusters_than_points_is_refused() -> None:
    with pytest.raises(ValueError, match="5 clusters asked of 4 points"):
        weighted_kmeans(torch.randn(4, 2), torch.ones(4), 5, seed=0)


def test_points_far_from_the_origin_are_grouped_as_if_they_were_not() -> None:
    """In float32, ‖x‖² − 2x·c + ‖c‖² loses the distances when every point shares a large offset (neuron
    values share a large positive mean): k-means works about the points' mean."""
    points, _ = _blobs(clusters=8, per_cluster=40, dims=16, seed=3)
    near = weighted_kmeans(points, torch.ones(len(points)), 8, seed=0)
    far = weighted_kmeans(points + 1e4, torch.ones(len(points)), 8, seed=0)
    assert torch.equal(near.labels, far.labels)
    assert torch.allclose(far.centres - 1e4, near.centres, atol=1e-2)


def test_lloyd_stops_once_an_iteration_barely_lowers_the_cost() -> None:
    points = torch.randn(4000, 24, generator=torch.Generator().manual_seed(4))
    weights = torch.ones(4000)
    patient = weighted_kmeans(points, weights, 64, seed=0, cost_tol=0.0)
    default = weighted_kmeans(points, weights, 64, seed=0)
    assert default.iterations < patient.iterations
    assert default.inertia < patient.inertia * 1.005


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_measuring_only_the_centres_that_moved_assigns_like_measuring_all(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Uneven, overlapping clusters: many centres move in the first iterations, few later.
    generator = torch.Generator().manual_seed(seed)
    points = torch.cat(
        [torch.randn(600, 30, generator=generator), 3 * torch.randn(200, 30, generator=generator)]
    )
    weights = torch.rand(len(points), generator=generator) + 0.1
    shortcut = weighted_kmeans(points, weights, 40, seed=seed, cost_tol=0.0)
    monkeypatch.setattr(
        kmeans, "_reassign", lambda points, norms, centres, *_: kmeans._assign(points, norms, centres)
    )
    measured_all = weighted_kmeans(points, weights, 40, seed=seed, cost_tol=0.0)
    assert shortcut.iterations == measured_all.iterations > 3
    assert torch.equal(shortcut.labels, measured_all.labels)
    assert torch.equal(shortcut.centres, measured_all.centres)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_seeding_from_the_table_of_all_pairs_picks_the_centres_measuring_each_picks(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = torch.Generator().manual_seed(seed)
    points = torch.cat(
        [torch.randn(300, 20, generator=generator), 4 + torch.randn(100, 20, generator=generator)]
    )
    weights = torch.rand(len(points), generator=generator) + 0.1
    norms = points.square().sum(1)
    # 400 points, 60 clusters of 6 candidates each: within the table's budget.
    assert len(points) <= kmeans.GRAM_SEEDING_RATIO * 60 * (2 + int(np.log(60)))
    tabled = kmeans._greedy_kmeans_plusplus(points, weights, norms, 60, torch.Generator().manual_seed(seed))
    monkeypatch.setattr(kmeans, "GRAM_SEEDING_BYTES", 0)
    measured = kmeans._greedy_kmeans_plusplus(points, weights, norms, 60, torch.Generator().manual_seed(seed))
    assert torch.equal(tabled, measured)
    assert len(torch.unique(tabled, dim=0)) == 60


def test_seeding_many_points_per_cluster_draws_from_a_sample_and_costs_about_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past `SEEDING_POINTS_PER_CLUSTER` points per cluster (K > 16 parents), the centres are drawn from a
    seeded sample of that many points per cluster, so the seeding's cost does not grow with K; Lloyd on
    every point then ends within a few percent of the cost a seeding on every point reaches."""
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(4096, 32, generator=generator)
    weights = torch.rand(4096, generator=generator) + 0.5
    seeded_from: list[int] = []
    greedy = kmeans._greedy_kmeans_plusplus

    def watched(points: torch.Tensor, *args: object) -> torch.Tensor:
        seeded_from.append(len(points))
        return greedy(points, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(kmeans, "_greedy_kmeans_plusplus", watched)
    sampled = [weighted_kmeans(points, weights, 64, seed=seed) for seed in range(3)]
    again = weighted_kmeans(points, weights, 64, seed=0)  # the sample is seeded: same seed, same clustering
    assert torch.equal(again.labels, sampled[0].labels)
    assert seeded_from == [kmeans.SEEDING_POINTS_PER_CLUSTER * 64] * 4
    monkeypatch.setattr(kmeans, "SEEDING_POINTS_PER_CLUSTER", len(points))
    everywhere = [weighted_kmeans(points, weights, 64, seed=seed).inertia for seed in range(3)]
    assert seeded_from[4:] == [4096] * 3
    assert sum(found.inertia for found in sampled) < 1.03 * sum(everywhere)
