"""Server sets and client partitions: disjoint, covering, seeded, and skewed the way their names say."""

from __future__ import annotations

import numpy as np
import pytest

from simulations.partitioning import (
    dirichlet,
    iid,
    label_histogram,
    pathological,
    quantity_skew,
    split_server_sets,
)

# 1000 labels over 10 classes of unequal sizes (class c has 55 + 10·c examples), in a scrambled order.
LABELS = np.random.default_rng(123).permutation(np.repeat(np.arange(10), 55 + 10 * np.arange(10)))
N = len(LABELS)

PARTITIONERS = {
    "iid": lambda y, seed: iid(y, 8, seed),
    "dirichlet": lambda y, seed: dirichlet(y, 8, 0.5, seed),
    "pathological": lambda y, seed: pathological(y, 8, 3, seed),
    "quantity_skew": lambda y, seed: quantity_skew(y, 8, 0.5, seed),
}


def mean_label_entropy(parts: list[np.ndarray]) -> float:
    """Mean over clients of the entropy (nats) of the client's label distribution."""
    hist = label_histogram(LABELS, parts, 10).astype(float)
    p = hist / hist.sum(axis=1, keepdims=True)
    return float(np.mean(-np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)))


@pytest.mark.parametrize("name", PARTITIONERS)
def test_partitions_use_every_index_exactly_once(name: str) -> None:
    parts = PARTITIONERS[name](LABELS, 0)
    assert len(parts) == 8 and all(part.dtype == np.int64 for part in parts)
    assert sorted(np.concatenate(parts).tolist()) == list(range(N))


@pytest.mark.parametrize("name", PARTITIONERS)
def test_same_seed_gives_the_same_partition_and_another_seed_a_different_one(name: str) -> None:
    first, again, other = (PARTITIONERS[name](LABELS, seed) for seed in (7, 7, 8))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_iid_sizes_differ_by_at_most_one() -> None:
    sizes = [len(part) for part in iid(LABELS, 7, seed=0)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == N


def test_dirichlet_label_skew_grows_as_alpha_shrinks() -> None:
    entropies = {
        alpha: np.mean(
            [mean_label_entropy(dirichlet(LABELS, 8, alpha, seed, min_partition_size=1)) for seed in range(5)]
        )
        for alpha in (0.1, 1.0, 10.0)
    }
    assert entropies[0.1] < entropies[1.0] < entropies[10.0]
    assert entropies[10.0] > 0.9 * np.log(10)  # nearly uniform labels per client
    assert entropies[0.1] < 0.5 * np.log(10)


def test_dirichlet_gives_every_client_at_least_the_minimum() -> None:
    parts = dirichlet(LABELS, 10, 0.3, seed=0, min_partition_size=40)
    assert min(len(part) for part in parts) >= 40


def test_dirichlet_gives_up_with_a_clear_error_when_the_minimum_is_out_of_reach() -> None:
    with pytest.raises(ValueError, match="no Dirichlet.*min_partition_size=95"):
        dirichlet(LABELS, 10, 0.01, seed=0, min_partition_size=95)


def test_dirichlet_rejects_a_minimum_that_cannot_fit() -> None:
    with pytest.raises(ValueError, match="need 1010 examples; there are 1000"):
        dirichlet(LABELS, 10, 1.0, seed=0, min_partition_size=101)


def test_pathological_clients_hold_exactly_c_classes_and_classes_are_shared_evenly() -> None:
    parts = pathological(LABELS, 8, 3, seed=0)
    hist = label_histogram(LABELS, parts, 10)
    assert ((hist > 0).sum(axis=1) == 3).all()
    holders = (hist > 0).sum(axis=0)
    assert holders.min() >= 2 and holders.max() <= 3  # 24 slots over 10 classes
    for label in range(10):
        shares = hist[:, label][hist[:, label] > 0]
        assert shares.max() - shares.min() <= 1


def test_pathological_leaves_out_classes_nobody_holds_when_too_few_slots() -> None:
    parts = pathological(LABELS, 2, 2, seed=0)
    hist = label_histogram(LABELS, parts, 10)
    assert ((hist > 0).sum(axis=1) == 2).all() and (hist.sum(axis=0) > 0).sum() == 4
    assert sum(len(part) for part in parts) == hist.sum() < N


def test_pathological_rejects_more_classes_per_client_than_classes() -> None:
    with pytest.raises(ValueError, match=r"classes_per_client must be in \[1, 10\]"):
        pathological(LABELS, 4, 11, seed=0)


def test_quantity_skew_sizes_spread_as_alpha_shrinks_while_labels_stay_iid() -> None:
    def size_spread(alpha: float) -> float:
        return np.mean([np.std([len(p) for p in quantity_skew(LABELS, 8, alpha, seed)]) for seed in range(5)])

    assert size_spread(0.2) > 2 * size_spread(20.0)
    big = max(quantity_skew(LABELS, 8, 0.2, seed=0), key=len)
    assert len(np.unique(LABELS[big])) == 10


def test_quantity_skew_keeps_every_client_non_empty() -> None:
    assert min(len(part) for part in quantity_skew(LABELS, 50, 0.05, seed=0)) >= 1


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: iid(LABELS, 0, seed=0), "num_clients must be >= 1"),
        (lambda: iid(LABELS, N + 1, seed=0), "exceeds the 1000 examples"),
        (lambda: dirichlet(LABELS, 4, 0.0, seed=0), "alpha must be > 0"),
        (lambda: quantity_skew(LABELS, 4, -1.0, seed=0), "alpha must be > 0"),
        (lambda: iid(LABELS.astype(float), 4, seed=0), "1-D integer array"),
    ],
)
def test_bad_arguments_are_rejected_with_clear_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_server_sets_are_disjoint_cover_the_data_and_have_the_requested_sizes() -> None:
    pool, calibration, evaluation = split_server_sets(LABELS, 95, 200, seed=0)
    assert (len(calibration), len(evaluation), len(pool)) == (95, 200, N - 295)
    assert sorted(np.concatenate([pool, calibration, evaluation]).tolist()) == list(range(N))


def test_calibration_set_is_as_class_balanced_as_its_size_allows() -> None:
    _, calibration, _ = split_server_sets(LABELS, 95, 200, seed=0)
    counts = np.bincount(LABELS[calibration], minlength=10)
    assert counts.min() == 9 and counts.max() == 10 and counts.sum() == 95


def test_server_sets_depend_only_on_the_seed() -> None:
    first, again, other = (split_server_sets(LABELS, 50, 100, seed) for seed in (1, 1, 2))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[1], other[1])


def test_server_sets_reject_sizes_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="exceeds the 1000 examples"):
        split_server_sets(LABELS, 600, 401, seed=0)
    tiny = np.array([0, 0, 0, 1])
    with pytest.raises(ValueError, match="class 1 has 1 examples, fewer than its calibration quota 2"):
        split_server_sets(tiny, 4, 0, seed=0)


def test_label_histogram_counts_each_clients_labels() -> None:
    y = np.array([0, 1, 1, 2, 2, 2])
    hist = label_histogram(y, [np.array([0, 1]), np.array([2, 3, 4, 5])], 4)
    assert hist.tolist() == [[1, 1, 0, 0], [0, 1, 3, 0]]
