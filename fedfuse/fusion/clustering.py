"""Grouping the K·n parent neurons of a level into the fused level's neurons.

The objective (weights s_j, assignment a(j), group targets T_k = importance-weighted member means) is the
importance-weighted k-means cost Σ_j s_j‖z_j − T_a(j)‖², where z_j is neuron j's vector of values over
all calibration rows. Grouping works on points with the same pairwise distances in few dimensions
(`fedfuse.fusion.embedding`), so its cost is linear in K: a Lloyd iteration costs O(K·n · n · r) and
a k-means++ start O(K·n · n · r · log n); starting from the reference parent's neurons instead saves the
restarts at some cost in accuracy (docs/benchmarks.md). Hungarian matching costs O(n³) for two parents;
grouping by index (parents that share an ancestor) costs nothing.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from fedfuse.fusion.kmeans import weighted_kmeans


def group_neurons(
    method: str,
    points: Tensor,
    scores: Tensor,
    width: int,
    groups: int,
    *,
    init: str = "k-means++",
    variance: float = 1.0,
    **kmeans: int,
) -> Tensor:
    """Group neurons by ``"kmeans"``, ``"hungarian"`` or ``"index"``: ``[K·n, groups]`` float64 shares,
    column k holding the weights s_j / S_k of group k's members (zero elsewhere), so that the group
    targets are T = Z·shares. Groups come out aligned with the reference parent's neurons (the first
    ``width`` points).

    Args:
        points: ``[m, r]`` one point per parent neuron (m = K·n, parent by parent), with the neurons'
            pairwise distances (`fedfuse.fusion.embedding.NeuronEmbedding.points`).
        scores: ``[m]`` positive importance weights s_j.
        width: neurons per parent, n.
        groups: fused neurons.
        init: how k-means starts: ``"reference"``, from the reference parent's neurons (when there are
            as many groups as it has neurons; k-means++ otherwise), or ``"k-means++"`` restarts.
        variance: k-means works on the points' leading principal components that hold this share of
            their weighted variance (`principal_components`); 1 keeps every dimension.
        kmeans: ``seed``, ``n_init`` (k-means++ restarts), ``max_iter`` for k-means.
    """
    if method == "index":
        if groups != width:
            raise ValueError(f"index grouping keeps the parents' {width} neurons; {groups} groups asked")
        per_parent = scores.reshape(-1, width)
        return shares_by_index(per_parent / per_parent.sum(dim=0, keepdim=True))
    if method == "hungarian":
        assignment = _hungarian(points, scores, groups)
    else:
        assignment = _kmeans(points, scores, width, groups, init=init, variance=variance, **kmeans)
    shares = _shares(assignment, scores, groups)
    return shares[:, _order_like_reference(points, shares, width)]


def shares_by_index(class_weights: Tensor) -> Tensor:
    """The output layer's grouping: neuron c of every parent forms group c, weighted ``[K, C]`` per class."""
    parents, classes = class_weights.shape
    shares = torch.zeros(parents * classes, classes, dtype=torch.float64)
    for parent in range(parents):
        shares[parent * classes : (parent + 1) * classes] = torch.diag(class_weights[parent])
    return shares


def _kmeans(
    points: Tensor,
    scores: Tensor,
    width: int,
    groups: int,
    *,
    init: str,
    variance: float,
    seed: int,
    n_init: int,
    max_iter: int,
) -> Tensor:
    # In float32, the precision of the activations the points come from: half the work of float64, and
    # the same groups (the cost a grouping reports is measured in float64 afterwards).
    weights, data = scores.float(), points.float()
    if projection_pays(*data.shape, groups):
        data = principal_components(data, weights, variance)
    start = data[:width] if init == "reference" and groups == width else None
    found = weighted_kmeans(data, weights, groups, seed=seed, n_init=n_init, max_iter=max_iter, start=start)
    return torch.as_tensor(_fill_empty_groups(data.numpy(), weights.numpy(), found.labels.numpy(), groups))


def principal_components(points: Tensor, weights: Tensor, variance: float) -> Tensor:
    """``[m, d]`` the points' coordinates along the fewest leading principal axes (of their ``weights``-
    weighted spread around the weighted mean) that hold a ``variance`` share of it; the points
    themselves when that takes all r dimensions.

    The weighted k-means cost of any grouping splits into its part in these d dimensions and its part in
    the rest, and the rest is at most the share left out of the points' total spread: with
    ``variance=0.999``, costs (so groupings) are compared to within 0.1% of the spread, at d/r of the
    work. Neuron values over a calibration set are far from isotropic (eight MNIST MLPs' 2,048
    first-layer neurons in 400 dimensions: 99.9% of the spread in 204, 99% in 73), so d is usually a
    fraction of r. The axes come from the smaller of the r x r spread and the m x m Gram matrix of the
    weighted points: O(m·r·s + s³), s = min(m, r).
    """
    m, r = points.shape
    if variance >= 1:
        return points
    centred = points - weights @ points / weights.sum()
    scaled = centred * weights.sqrt()[:, None]
    # In the points' precision (float32 from `_kmeans`): the eigenvalues only place a cut at a share of
    # the total near 1, and half the time of float64 (9.5 against 19 ms for 400 dimensions).
    if m < r:  # eigenvectors U of the Gram matrix give the axes: scaledᵀ·U / √λ
        values, vectors = torch.linalg.eigh(scaled @ scaled.T)  # ascending
    else:
        values, vectors = torch.linalg.eigh(scaled.T @ scaled)
    held = values.flip(0).clamp_min(0).cumsum(0)
    dims = min(int(torch.searchsorted(held, variance * held[-1])) + 1, r)
    if dims == r:
        return points
    axes = vectors[:, -dims:]
    if m < r:
        axes = scaled.T @ axes / values[-dims:].clamp_min(torch.finfo(values.dtype).tiny).sqrt()
    return centred @ axes


#: Lloyd iterations a k-means run is expected to take, for weighing a projection against what it saves
#: (runs on the fusion benchmark's levels took 10-30).
EXPECTED_LLOYD_ITERATIONS = 10


def projection_pays(points: int, dims: int, groups: int) -> bool:
    """Whether `principal_components` of ``points`` x ``dims`` (O(m·r·s + s³), s = min(m, r)) costs less
    than half the k-means work it shortens: O(m·r·k) per Lloyd iteration and per k-means++ trial. Many
    groups of few dimensions pay (eight MLPs' 256 groups in 400 dimensions); a convolution's few
    channels in a wide sketch do not."""
    smaller = min(points, dims)
    trials = 2 + math.log(groups)
    kmeans = points * dims * groups * (EXPECTED_LLOYD_ITERATIONS + trials)
    return points * dims * smaller + smaller**3 < kmeans / 2


def _fill_empty_groups(
    points: np.ndarray, weights: np.ndarray, labels: np.ndarray, groups: int
) -> np.ndarray:
    """Give every empty group the neuron farthest from its own group's mean, from the most crowded group
    on ties (k-means can leave a group empty when there are fewer distinct neurons than groups, as when
    several neurons are dead: identical zeros); an empty group would be a dead fused neuron."""
    labels = labels.copy()
    for empty in np.setdiff1d(np.arange(groups), labels):
        counts = np.bincount(labels, minlength=groups)
        centres = np.stack(
            [
                np.average(points[labels == g], axis=0, weights=weights[labels == g])
                if counts[g]
                else np.zeros(points.shape[1])
                for g in range(groups)
            ]
        )
        distance = weights * ((points - centres[labels]) ** 2).sum(1)
        distance[counts[labels] < 2] = -np.inf
        labels[int(np.lexsort((counts[labels], distance))[-1])] = empty
    return labels


def _hungarian(points: Tensor, scores: Tensor, groups: int) -> Tensor:
    """Pair each neuron of parent 0 with one of parent 1, at least total merging cost
    s_i·s_j/(s_i + s_j)·‖z_i − z_j‖² (the weighted k-means cost of the pair)."""
    from scipy.optimize import linear_sum_assignment

    n = points.shape[0] // 2
    if n != groups:
        raise ValueError(
            f"hungarian matching pairs the two parents' {n} neurons one to one; {groups} groups asked"
        )
    distance = _squared_distances(points[:n], points[n:])
    s0, s1 = scores[:n, None], scores[None, n:]
    rows, cols = linear_sum_assignment((s0 * s1 / (s0 + s1) * distance).numpy())
    assignment = torch.empty(2 * n, dtype=torch.long)
    assignment[torch.as_tensor(rows)] = torch.as_tensor(rows)
    assignment[n + torch.as_tensor(cols)] = torch.as_tensor(rows)
    return assignment


def _shares(assignment: Tensor, scores: Tensor, groups: int) -> Tensor:
    shares = torch.zeros(len(assignment), groups, dtype=torch.float64)
    shares[torch.arange(len(assignment)), assignment] = scores
    return shares / shares.sum(0, keepdim=True)


def _order_like_reference(points: Tensor, shares: Tensor, width: int) -> Tensor:
    """A permutation of the groups that puts at position i the group whose target is closest to the
    reference parent's neuron i, so the fused level lines up with it (a warm start and a readable
    model); groups beyond its width keep their order after those."""
    from scipy.optimize import linear_sum_assignment

    _, matched = linear_sum_assignment(_squared_distances(points[:width], mix(shares, points)).numpy())
    rest = np.setdiff1d(np.arange(shares.shape[1]), matched)
    return torch.as_tensor(np.concatenate([matched, rest]))


def mix(shares: Tensor, values: Tensor) -> Tensor:
    """``shares.T @ values``, ``[groups, ...]`` from ``[m, groups]`` and ``[m, ...]``: each group's mix of
    its members' rows. A grouping gives each neuron at most one group, so the product is a weighted
    scatter of the m rows, not a dense product over all groups (256 times less work at 256 groups)."""
    members = shares != 0
    if bool((members.sum(dim=1) > 1).any()):
        return shares.to(values).T @ values
    owner = shares.argmax(dim=1)
    share = shares.gather(1, owner[:, None]).to(values)
    mixed = values.new_zeros((shares.shape[1], *values.shape[1:]))
    return mixed.index_add_(0, owner.to(values.device), values * share.reshape(-1, *[1] * (values.dim() - 1)))


def _squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """``[len(a), len(b)]`` squared Euclidean distances, never below zero."""
    return ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]).clamp_min(0)


#: Neurons whose points `grouping_cost` handles at once: its working memory is a few copies of this many
#: points, not of all K·n (at K = 64 MLPs, whole copies peaked at 159 MB).
COST_CHUNK = 4096


def grouping_cost(
    points: Tensor, variances: Tensor, scores: Tensor, shares: Tensor, scales: Tensor | None = None
) -> float:
    """Σ_j s_j‖z_j − T_a(j)‖² / Σ_j s_j‖z_j − z̄_j‖², from the points z_j (each multiplied by its
    ``scales`` entry, if given), for any shares matrix (a neuron with share 0 in every group counts as no
    group's member). Worked through `COST_CHUNK` neurons at a time."""
    scales = torch.ones(len(points), dtype=points.dtype) if scales is None else scales.to(points)
    chunks = [slice(start, start + COST_CHUNK) for start in range(0, len(points), COST_CHUNK)]
    targets = sum(mix(shares[rows], points[rows] * scales[rows, None]) for rows in chunks)  # [groups, r]
    assert isinstance(targets, Tensor)
    assignment, member = shares.argmax(dim=1), (shares > 0).any(dim=1)
    lost = sum(
        (
            scores[rows]
            * member[rows]
            * ((points[rows] * scales[rows, None] - targets[assignment[rows]]) ** 2).sum(1)
        ).sum()
        for rows in chunks
    )
    variance = (scores * variances).sum()
    return float(torch.as_tensor(lost).clamp_min(0) / variance) if variance > 0 else 0.0
