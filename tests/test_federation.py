"""The federation a simulation emulates: partitioning by name; the server's sets kept from every client."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simulations.federation import federated_split, model_builder
from simulations.partitioning import dirichlet, iid, label_histogram, partition, pathological, quantity_skew

LABELS = np.random.default_rng(5).permutation(np.repeat(np.arange(10), 80))


@pytest.mark.parametrize(
    ("scheme", "arguments", "direct"),
    [
        ("iid", {}, lambda: iid(LABELS, 6, 3)),
        ("dirichlet", {"alpha": 0.3}, lambda: dirichlet(LABELS, 6, 0.3, 3)),
        ("pathological", {"classes_per_client": 2}, lambda: pathological(LABELS, 6, 2, 3)),
        ("quantity-skew", {"alpha": 0.5}, lambda: quantity_skew(LABELS, 6, 0.5, 3)),
    ],
)
def test_partition_by_name_is_the_named_partitioner(scheme, arguments, direct) -> None:
    by_name = partition(LABELS, scheme, 6, 3, **arguments)
    assert all(np.array_equal(a, b) for a, b in zip(by_name, direct(), strict=True))


@pytest.mark.parametrize(
    ("scheme", "arguments", "message"),
    [
        ("shards", {}, "unknown partitioning 'shards'"),
        ("dirichlet", {}, "alpha is required for partitioning 'dirichlet'"),
        ("iid", {"alpha": 0.5}, "alpha is meaningless for partitioning 'iid'"),
        ("pathological", {}, "classes_per_client is required"),
        ("dirichlet", {"alpha": 0.5, "classes_per_client": 2}, "classes_per_client is meaningless"),
    ],
)
def test_partition_refuses_a_scheme_without_its_parameter_or_with_a_foreign_one(scheme, arguments, message):
    with pytest.raises(ValueError, match=message):
        partition(LABELS, scheme, 4, 0, **arguments)


@pytest.mark.parametrize(
    ("scheme", "arguments"),
    [("iid", {}), ("dirichlet", {"alpha": 0.1}), ("pathological", {"classes_per_client": 2})],
)
def test_calibration_and_evaluation_sets_are_disjoint_from_every_clients_data(scheme, arguments) -> None:
    split = federated_split("digits", None, 150, 300, seed=2)
    clients = split.client_indices(scheme, 5, 2, **arguments)
    server = set(split.calibration.tolist()) | set(split.evaluation.tolist())
    assert len(server) == 450
    for indices in clients:
        assert not server & set(indices.tolist())
        assert set(indices.tolist()) <= set(split.pool.tolist())
    calibration_counts = np.bincount(split.data.y.numpy()[split.calibration], minlength=10)
    assert calibration_counts.tolist() == [15] * 10  # class-balanced


def test_client_label_skew_grows_as_alpha_shrinks_on_the_pool() -> None:
    split = federated_split("digits", None, 200, 300, seed=0)
    labels = split.data.y.numpy()

    def dominant_share(alpha: float) -> float:
        """Mean over clients and seeds of the share of a client's examples in its largest class."""
        shares = []
        for seed in range(4):
            counts = label_histogram(labels, split.client_indices("dirichlet", 5, seed, alpha=alpha), 10)
            shares += (counts.max(axis=1) / counts.sum(axis=1)).tolist()
        return float(np.mean(shares))

    assert dominant_share(0.1) > dominant_share(1.0) > dominant_share(100.0)


def test_the_model_builder_fits_the_data_and_its_seed_fixes_the_init() -> None:
    split = federated_split("digits", "", 100, 100, seed=0)
    build = model_builder("cnn", split.data)
    logits = build(seed=1)(split.data.x[:4])
    assert logits.shape == (4, 10)
    first, again = build(seed=1).state_dict(), build(seed=1).state_dict()
    assert all(torch.equal(first[key], again[key]) for key in first)
