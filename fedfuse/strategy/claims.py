"""What the clients claim about their data, capped before it weights a fusion.

With ``parent_weights="num-examples"`` or ``"label-counts"`` the fusion weights the clients by what they
say. A client could say anything finite: 1e12 examples to take the fusion over, 1e308 to overflow the
sum. The rule: **a client's total claim counts for at most ``cap`` times the median total of the clients
in the round**; a larger claim is scaled down to that (its per-class proportions kept), and named. The
median is the lower median (the lower of the two middle values), so that a minority of inflated claims
cannot move it. The capped weights are then divided by the largest, computed in logarithms, so that no
sum of claims can overflow. Honest quantity skew within a factor ``cap`` of the median passes unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CappedClaims:
    """Claims made safe to weight a fusion.

    Attributes:
        weights: ``[K]`` or ``[K, C]``, as the claims came, scaled so that the largest total is 1.
        capped: indices of the clients whose claim was capped.
        reference: the median total claim the cap is measured against.
    """

    weights: np.ndarray
    capped: list[int]
    reference: float


def cap_claims(claims: np.ndarray, cap: float) -> CappedClaims:
    """Cap each client's total claim at ``cap`` times the clients' lower median (see the module).

    Args:
        claims: ``[K]`` positive finite claimed example counts, or ``[K, C]`` non-negative finite claimed
            label counts with positive row sums (as `fedfuse.strategy.replies` checks them).
        cap: at least 1.

    Raises:
        ValueError: a cap below 1, or claims that are not positive and finite.
    """
    if not cap >= 1 or not math.isfinite(cap):
        raise ValueError(f"the claim cap must be a finite number of at least 1, got {cap}")
    claims = np.asarray(claims, dtype=np.float64)
    rows = claims.reshape(len(claims), -1)
    if not np.isfinite(rows).all() or (rows < 0).any() or not (rows.max(axis=1) > 0).all():
        raise ValueError("claims must be finite and non-negative, with a positive total per client")
    # Each row's total, in logarithms and without overflow: log(max) + log(sum(row / max)).
    largest = rows.max(axis=1)
    proportions = rows / largest[:, None]
    logs = np.log(largest) + np.log(proportions.sum(axis=1))
    reference = np.sort(logs)[(len(logs) - 1) // 2]
    capped_logs = np.minimum(logs, reference + math.log(cap))
    scaled_totals = np.exp(capped_logs - capped_logs.max())  # in (0, 1], the largest exactly 1
    if claims.ndim == 1:
        weights = scaled_totals
    else:
        weights = proportions / proportions.sum(axis=1, keepdims=True) * scaled_totals[:, None]
    capped = [int(k) for k in np.nonzero(logs > capped_logs)[0]]
    return CappedClaims(weights, capped, float(math.exp(reference)))
