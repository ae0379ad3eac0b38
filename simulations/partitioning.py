"""Splitting a labelled data set for a federated simulation: server-side sets and client partitions.

All functions take a label array ``y`` (int [N]) and return index arrays into it (int64), so that they
work on any data set held in memory. They follow the meaning of the partitioners of flwr-datasets
(``IidPartitioner``, ``DirichletPartitioner``, ``PathologicalPartitioner``), rewritten in numpy to
keep that package's dependencies out of the project. Every random choice is drawn from
``numpy.random.default_rng(seed)``: the same seed gives the same split.
"""

from __future__ import annotations

import numpy as np

_DIRICHLET_MAX_TRIES = 100

#: The partitioning schemes by name, as `partition` takes them.
PARTITIONINGS = ("iid", "dirichlet", "pathological", "quantity-skew")
#: The schemes that take a concentration ``alpha`` (``pathological`` takes ``classes_per_client``).
ALPHA_PARTITIONINGS = ("dirichlet", "quantity-skew")


def split_server_sets(
    y: np.ndarray, calibration_size: int, evaluation_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split indices into a client pool, a class-balanced calibration set and an evaluation set.

    The calibration set is what the server fuses on: it holds ``calibration_size // C`` examples of
    each of the C classes in ``y``, and one more for ``calibration_size % C`` randomly chosen
    classes. The evaluation set is a uniform random sample of the rest (so it follows the data's
    class frequencies). The client pool is everything left. The three are disjoint.

    Args:
        y: labels, int [N].
        calibration_size: examples in the calibration set (0 for none).
        evaluation_size: examples in the evaluation set (0 for none).
        seed: seeds the sampling.

    Returns:
        ``(client_pool, calibration, evaluation)`` index arrays, each sorted.

    Raises:
        ValueError: negative sizes, sizes that do not fit in N, or a class too small for its
            calibration quota.
    """
    y = _check_labels(y)
    if calibration_size < 0 or evaluation_size < 0:
        raise ValueError(
            f"calibration_size and evaluation_size must be >= 0, got {calibration_size} and {evaluation_size}"
        )
    if calibration_size + evaluation_size > len(y):
        raise ValueError(
            f"calibration_size + evaluation_size = {calibration_size + evaluation_size} exceeds the "
            f"{len(y)} examples"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    quota = np.full(len(classes), calibration_size // len(classes))
    quota[rng.choice(len(classes), calibration_size % len(classes), replace=False)] += 1
    calibration = []
    for label, count in zip(classes, quota):
        members = np.flatnonzero(y == label)
        if count > len(members):
            raise ValueError(
                f"class {label} has {len(members)} examples, fewer than its calibration quota {count}"
            )
        calibration.append(rng.choice(members, count, replace=False))
    calibration_idx = np.sort(np.concatenate(calibration)).astype(np.int64)
    rest = np.setdiff1d(np.arange(len(y)), calibration_idx)
    evaluation_idx = np.sort(rng.choice(rest, evaluation_size, replace=False)).astype(np.int64)
    pool_idx = np.setdiff1d(rest, evaluation_idx).astype(np.int64)
    return pool_idx, calibration_idx, evaluation_idx


def iid(y: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle and deal the examples into ``num_clients`` parts whose sizes differ by at most one.

    Flower's ``IidPartitioner``. Every index goes to exactly one client.
    """
    y = _check_labels(y)
    _check_num_clients(num_clients, len(y))
    order = np.random.default_rng(seed).permutation(len(y))
    return [part.astype(np.int64) for part in np.array_split(order, num_clients)]


def dirichlet(
    y: np.ndarray, num_clients: int, alpha: float, seed: int, min_partition_size: int = 10
) -> list[np.ndarray]:
    """Label skew: each class is shared out over the clients in proportions drawn from Dir(alpha).

    Flower's ``DirichletPartitioner`` (without self-balancing): for every class, proportions
    p ~ Dir(alpha·1_K) over the K clients cut the (shuffled) class members into K consecutive
    pieces. Small alpha concentrates each class on few clients; large alpha approaches IID. The
    whole draw is repeated until every client holds at least ``min_partition_size`` examples.
    Every index goes to exactly one client.

    Raises:
        ValueError: alpha <= 0, a bad ``num_clients``, or no draw out of 100 gave every client
            ``min_partition_size`` examples (raise alpha, or lower the minimum or the clients).
    """
    y = _check_labels(y)
    _check_alpha(alpha)
    _check_num_clients(num_clients, len(y))
    if min_partition_size * num_clients > len(y):
        raise ValueError(
            f"{num_clients} clients of at least min_partition_size={min_partition_size} need "
            f"{min_partition_size * num_clients} examples; there are {len(y)}"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    for _ in range(_DIRICHLET_MAX_TRIES):
        pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for label in classes:
            members = rng.permutation(np.flatnonzero(y == label))
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
            for client, piece in enumerate(np.split(members, cuts)):
                pieces[client].append(piece)
        parts = [np.sort(np.concatenate(p)).astype(np.int64) for p in pieces]
        if min(len(part) for part in parts) >= min_partition_size:
            return parts
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw out of {_DIRICHLET_MAX_TRIES} gave all {num_clients} clients "
        f"at least min_partition_size={min_partition_size} of the {len(y)} examples; raise alpha or "
        "lower min_partition_size or num_clients"
    )


def pathological(y: np.ndarray, num_clients: int, classes_per_client: int, seed: int) -> list[np.ndarray]:
    """Each client holds exactly ``classes_per_client`` classes; each class is split evenly among its holders.

    Like Flower's ``PathologicalPartitioner``, with a balanced class assignment: the classes are
    put in a random cyclic order and dealt out ``classes_per_client`` at a time, so client k gets
    the classes at positions k·c, ..., k·c + c − 1 (mod C). When K·c >= C every class has a holder
    and every index goes to exactly one client; otherwise, as in Flower, the classes nobody holds
    are left out.

    Raises:
        ValueError: a bad ``num_clients``, ``classes_per_client`` outside [1, C], or a class with
            fewer examples than holders.
    """
    y = _check_labels(y)
    _check_num_clients(num_clients, len(y))
    classes = np.unique(y)
    if not 1 <= classes_per_client <= len(classes):
        raise ValueError(
            f"classes_per_client must be in [1, {len(classes)}] (the classes present), "
            f"got {classes_per_client}"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    held = [
        order[(k * classes_per_client + np.arange(classes_per_client)) % len(classes)]
        for k in range(num_clients)
    ]
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in classes:
        holders = [k for k in range(num_clients) if label in held[k]]
        if not holders:
            continue
        members = rng.permutation(np.flatnonzero(y == label))
        if len(members) < len(holders):
            raise ValueError(
                f"class {label} has {len(members)} examples, fewer than its {len(holders)} holders"
            )
        for client, piece in zip(holders, np.array_split(members, len(holders))):
            pieces[client].append(piece)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in pieces]


def quantity_skew(
    y: np.ndarray, num_clients: int, alpha: float, seed: int, min_partition_size: int = 1
) -> list[np.ndarray]:
    """Size skew with IID labels: client sizes follow Dir(alpha) proportions of the examples.

    Every client first gets ``min_partition_size`` examples; the rest are shared out in
    proportions p ~ Dir(alpha·1_K) (rounded by largest remainder, so the sizes sum to N). The
    examples are shuffled before dealing, so each client's labels are an IID sample. Small alpha
    gives a few large clients and many small ones. Every index goes to exactly one client.
    (flwr-datasets has no Dirichlet size partitioner; this is the usual "quantity skew" setting.)

    Raises:
        ValueError: alpha <= 0, a bad ``num_clients``, or too few examples for the minimum.
    """
    y = _check_labels(y)
    _check_alpha(alpha)
    _check_num_clients(num_clients, len(y))
    spare = len(y) - min_partition_size * num_clients
    if min_partition_size < 0 or spare < 0:
        raise ValueError(
            f"{num_clients} clients of min_partition_size={min_partition_size} "
            f"do not fit in {len(y)} examples"
        )
    rng = np.random.default_rng(seed)
    shares = rng.dirichlet(np.full(num_clients, alpha)) * spare
    extra = np.floor(shares).astype(int)
    extra[np.argsort(extra - shares)[: spare - extra.sum()]] += 1
    sizes = min_partition_size + extra
    order = rng.permutation(len(y))
    return [np.sort(part).astype(np.int64) for part in np.split(order, np.cumsum(sizes)[:-1])]


def partition(
    y: np.ndarray,
    scheme: str,
    num_clients: int,
    seed: int,
    *,
    alpha: float | None = None,
    classes_per_client: int | None = None,
) -> list[np.ndarray]:
    """Partition by scheme name, so that a simulation picks its partitioner by an option.

    Args:
        y: labels, int [N].
        scheme: one of `PARTITIONINGS`: ``"iid"`` (`iid`), ``"dirichlet"`` (`dirichlet`, label skew),
            ``"pathological"`` (`pathological`, c classes per client), ``"quantity-skew"``
            (`quantity_skew`, size skew).
        num_clients: K.
        seed: seeds the partitioner.
        alpha: the Dirichlet concentration of ``"dirichlet"`` and ``"quantity-skew"`` (required there,
            refused elsewhere).
        classes_per_client: c of ``"pathological"`` (required there, refused elsewhere).

    Returns:
        K index arrays into ``y`` (int64), as the named partitioner returns them.

    Raises:
        ValueError: an unknown scheme, or ``alpha`` / ``classes_per_client`` missing where needed or
            given where the scheme has no use for it; and whatever the partitioner raises.
    """
    check_scheme(scheme, alpha, classes_per_client)
    if scheme == "iid":
        return iid(y, num_clients, seed)
    if scheme == "dirichlet":
        return dirichlet(y, num_clients, alpha, seed)
    if scheme == "pathological":
        return pathological(y, num_clients, classes_per_client, seed)
    return quantity_skew(y, num_clients, alpha, seed)


def check_scheme(scheme: str, alpha: float | None, classes_per_client: int | None) -> None:
    """Refuse an unknown scheme, or ``alpha`` / ``classes_per_client`` missing where `partition` needs
    them or given where the scheme has no use for them (a ValueError naming the scheme)."""
    if scheme not in PARTITIONINGS:
        raise ValueError(
            f"unknown partitioning {scheme!r}; choose one of {', '.join(map(repr, PARTITIONINGS))}"
        )
    if (alpha is not None) != (scheme in ALPHA_PARTITIONINGS):
        raise ValueError(
            f"alpha is {'required' if alpha is None else 'meaningless'} for partitioning {scheme!r} "
            f"(it applies to {' and '.join(ALPHA_PARTITIONINGS)} only), got alpha={alpha}"
        )
    if (classes_per_client is not None) != (scheme == "pathological"):
        raise ValueError(
            f"classes_per_client is {'required' if classes_per_client is None else 'meaningless'} for "
            f"partitioning {scheme!r} (it applies to 'pathological' only), got {classes_per_client}"
        )


def label_histogram(y: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Label counts per client, int64 [K, num_classes]: row k counts the labels of ``y[parts[k]]``."""
    y = _check_labels(y)
    if len(y) and int(y.max()) >= num_classes:
        raise ValueError(f"labels reach {int(y.max())}, outside num_classes={num_classes}")
    return np.stack([np.bincount(y[part], minlength=num_classes) for part in parts]).astype(np.int64)


def _check_labels(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {y.dtype} with shape {y.shape}")
    if len(y) and int(y.min()) < 0:
        raise ValueError(f"labels must be >= 0, got {int(y.min())}")
    return y


def _check_num_clients(num_clients: int, n: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > n:
        raise ValueError(f"num_clients={num_clients} exceeds the {n} examples: some clients would be empty")


def _check_alpha(alpha: float) -> None:
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
