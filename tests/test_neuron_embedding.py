"""The points grouping works on: the neurons' pairwise distances, in at most `grouping_dims` dimensions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from fedfuse.fusion.embedding import NeuronEmbedding

EXACT = "donot_use_mm_for_euclid_dist"


def _embedded(z: torch.Tensor, dims: int, batch: int = 64, seed: int = 0) -> NeuronEmbedding:
    embedding = NeuronEmbedding(samples=z.shape[0], dims=dims, seed=seed)
    for start in range(0, z.shape[0], batch):
        embedding.add(z[start : start + batch], samples=len(z[start : start + batch]))
    return embedding


def _distances(points: torch.Tensor) -> torch.Tensor:
    return torch.cdist(points, points, compute_mode=EXACT)


@pytest.mark.parametrize(
    ("rows", "neurons", "dims", "mode"),
    [(300, 40, 512, "values"), (3000, 40, 512, "gram")],
)
def test_the_exact_embeddings_keep_every_pairwise_distance(
    rows: int, neurons: int, dims: int, mode: str
) -> None:
    z = torch.randn(rows, neurons, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    embedding = _embedded(z, dims)
    assert embedding.mode == mode
    points = embedding.points()
    assert points.shape[1] <= dims
    assert torch.allclose(_distances(points), _distances(z.T), atol=1e-8)


def test_the_sketch_keeps_distances_within_its_documented_error_and_memory() -> None:
    """More rows and neurons than the budget: D buckets, squared distances within a few √(2/D)."""
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(20_000, 12, dtype=torch.float64, generator=generator) @ torch.randn(
        12, 600, dtype=torch.float64, generator=generator
    )
    embedding = _embedded(z, dims=512, batch=1000)
    assert embedding.mode == "sketch"
    points = embedding.points()
    assert points.shape == (600, 512)
    true, sketched = _distances(z.T) ** 2, _distances(points) ** 2
    off_diagonal = ~torch.eye(600, dtype=torch.bool)
    relative = (sketched[off_diagonal] / true[off_diagonal] - 1).abs()
    assert float(relative.median()) < (2 / 512) ** 0.5
    assert float(relative.max()) < 6 * (2 / 512) ** 0.5


def test_the_sketch_is_the_same_for_the_same_seed_and_batches_and_differs_for_another_seed() -> None:
    z = torch.randn(4000, 600, generator=torch.Generator().manual_seed(2))
    first, again, other = (_embedded(z, 256, seed=seed).points() for seed in (0, 0, 1))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_variances_are_exact_in_every_mode() -> None:
    z = torch.randn(5000, 600, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 3 + 1
    for dims in (8_000, 1_000, 100):  # values, gram, sketch
        embedding = _embedded(z, dims, batch=500)
        assert torch.allclose(embedding.variances, z.var(0, unbiased=False) * len(z))


def test_kmeans_on_the_embedding_equals_kmeans_on_the_raw_neuron_vectors() -> None:
    """The exact embedding keeps every pairwise distance, so k-means finds the same groups as on the
    vectors."""
    z = torch.randn(500, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    points = _embedded(z, dims=100).points().numpy()
    weights = np.linspace(0.5, 2.0, 30)
    raw = KMeans(8, n_init=3, random_state=0).fit(z.T.numpy(), sample_weight=weights)
    embedded = KMeans(8, n_init=3, random_state=0).fit(points, sample_weight=weights)
    assert embedded.inertia_ == pytest.approx(raw.inertia_, rel=1e-9)


def test_no_neuron_ever_active_gives_one_coordinate_of_zeros() -> None:
    embedding = _embedded(torch.zeros(2000, 5), dims=100)
    assert torch.equal(embedding.points(), torch.zeros(5, 1))
