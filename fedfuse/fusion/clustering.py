"""Grouping the K·n parent neurons of a level into the fused level's neurons.

The objective (weights s_j, assignment a(j), group targets T_k = importance-weighted member means) is the
importance-weighted k-means cost Σ_j s_j‖z_j − T_a(j)‖², where z_j is neuron j's vector of values over
all calibration rows. Those vectors can be very long for a convolution (samples × positions), so grouping
works from their Gram matrix G = ZᵀZ alone, accumulated batch by batch: an eigendecomposition G = UΛUᵀ
gives points E = U·Λ^½ with exactly the neurons' pairwise distances (‖e_i − e_j‖ = ‖z_i − z_j‖), on which
scikit-learn's weighted k-means runs. Nothing is approximated beyond float64 round-off; the price is an
eigendecomposition of a (K·n)² matrix, O((K·n)³), small next to the passes over the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from torch import Tensor


@dataclass(frozen=True)
class Grouping:
    """A level's grouping.

    Attributes:
        shares: ``[K·n, groups]`` float64: column k holds the weights s_j / S_k of group k's members
            (zero elsewhere), so the group targets are T = Z·shares.
        cost: the importance-weighted share of the neurons' variance that merging loses (see
            `LevelReport.grouping_cost`); 0 when every group's members agree.
    """

    shares: Tensor
    cost: float


def group_neurons(
    method: str, gram: Tensor, variances: Tensor, scores: Tensor, width: int, groups: int, **kmeans
) -> Grouping:
    """Group neurons by ``"kmeans"`` or ``"hungarian"``; groups come out aligned with parent 0's neurons.

    Args:
        gram: ``[m, m]`` Gram matrix ZᵀZ of the m = K·n parent neurons, parent by parent.
        variances: ``[m]`` each neuron's spread around its own mean, in the units of ``gram`` (the cost's
            denominator).
        scores: ``[m]`` positive importance weights s_j.
        width: neurons per parent, n.
        groups: fused neurons.
        kmeans: ``seed``, ``n_init``, ``max_iter`` for k-means.
    """
    if method == "hungarian":
        assignment = _hungarian(gram, scores, groups)
    else:
        assignment = _kmeans(gram, scores, groups, **kmeans)
    shares = _shares(assignment, scores, groups)
    shares = shares[:, _order_like_parent_zero(gram, shares, width)]
    return Grouping(shares, grouping_cost(gram, variances, scores, shares))


def shares_by_index(class_weights: Tensor) -> Tensor:
    """The output layer's grouping: neuron c of every parent forms group c, weighted ``[K, C]`` per class."""
    parents, classes = class_weights.shape
    shares = torch.zeros(parents * classes, classes, dtype=torch.float64)
    for parent in range(parents):
        shares[parent * classes : (parent + 1) * classes] = torch.diag(class_weights[parent])
    return shares


def _embedding(gram: Tensor) -> np.ndarray:
    """Points with the neurons' pairwise distances; one coordinate of zeros when every neuron is zero (all
    dead, say): then every grouping costs the same."""
    values, vectors = torch.linalg.eigh(gram)
    keep = values > values.max().clamp_min(0) * gram.shape[0] * torch.finfo(torch.float64).eps
    if not bool(keep.any()):
        return np.zeros((gram.shape[0], 1))
    return (vectors[:, keep] * values[keep].sqrt()).numpy()


def _kmeans(gram: Tensor, scores: Tensor, groups: int, *, seed: int, n_init: int, max_iter: int) -> Tensor:
    points = _embedding(gram)
    weights = scores.numpy()
    kmeans = KMeans(n_clusters=groups, n_init=n_init, max_iter=max_iter, random_state=seed)
    labels = kmeans.fit(points, sample_weight=weights).labels_
    return torch.as_tensor(_fill_empty_groups(points, weights, labels, groups))


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


def _hungarian(gram: Tensor, scores: Tensor, groups: int) -> Tensor:
    """Pair each neuron of parent 0 with one of parent 1, at least total merging cost
    s_i·s_j/(s_i + s_j)·‖z_i − z_j‖² (the weighted k-means cost of the pair)."""
    n = gram.shape[0] // 2
    if n != groups:
        raise ValueError(
            f"hungarian matching pairs the two parents' {n} neurons one to one; {groups} groups asked"
        )
    diag = gram.diagonal()
    distance = diag[:n, None] + diag[None, n:] - 2 * gram[:n, n:]
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


def _order_like_parent_zero(gram: Tensor, shares: Tensor, width: int) -> Tensor:
    """A permutation of the groups that puts at position i the group whose target is closest to parent
    0's neuron i, so the fused level lines up with parent 0 (a warm start and a readable model); groups
    beyond parent 0's width keep their order after those."""
    target_norms = (shares * (gram @ shares)).sum(0)
    distance = target_norms[None, :] - 2 * gram[:width] @ shares + gram.diagonal()[:width, None]
    _, matched = linear_sum_assignment(distance.numpy())
    rest = np.setdiff1d(np.arange(shares.shape[1]), matched)
    return torch.as_tensor(np.concatenate([matched, rest]))


def grouping_cost(gram: Tensor, variances: Tensor, scores: Tensor, shares: Tensor) -> float:
    """Σ_j s_j‖z_j − T_a(j)‖² / Σ_j s_j‖z_j − z̄_j‖², from the Gram matrix, for any shares matrix
    (a neuron with share 0 in every group counts as no group's member)."""
    members = shares > 0
    target_norms = (shares * (gram @ shares)).sum(0)
    distance = gram.diagonal()[:, None] - 2 * gram @ shares + target_norms[None, :]
    lost = (scores[:, None] * distance * members).sum()
    variance = (scores * variances).sum()
    return float(lost.clamp_min(0) / variance) if variance > 0 else 0.0
