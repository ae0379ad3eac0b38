"""Deciding a level's group targets, for either variant: score the parents' neurons, then group them
(or match the output layer's classes by index, or reuse a residual stream's grouping)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedfuse.fusion.context import FusionContext
from fedfuse.fusion.grouping import group_neurons, grouping_cost, shares_by_index
from fedfuse.fusion.importance import importance_scores


@dataclass(frozen=True)
class LevelGrouping:
    """How a level's K·n parent neurons make its fused neurons.

    Attributes:
        method: ``"kmeans"``, ``"hungarian"``, ``"index"`` (output layer) or ``"stream"`` (shared).
        shares: ``[K·n, groups]``: the group targets are T = Z·shares (columns sum to 1).
        scores: ``[K·n]`` the neurons' importance, parent weights included.
        group_weights: ``[groups]`` S_k, the total importance of each group.
        cost: the share of neuron variance that merging loses (`LevelReport.grouping_cost`).
        importance_seconds, grouping_seconds: where the time went.
    """

    method: str
    shares: Tensor
    scores: Tensor
    group_weights: Tensor
    cost: float
    importance_seconds: float = 0.0
    grouping_seconds: float = 0.0


def group_level(
    gram: Tensor,
    sums: Tensor,
    rows: int,
    *,
    context: FusionContext,
    scored_modules: Sequence[nn.Module],
    is_output: bool,
    groups: int | None = None,
    stream: LevelGrouping | None = None,
) -> LevelGrouping:
    """The grouping of one level, from its parents' Gram matrix ``gram`` ``[K·n, K·n]`` (and column sums).

    Args:
        scored_modules: per parent, the module whose output holds the level's neurons (for importance).
        is_output: the output layer: classes are matched by index, weighted per class.
        groups: fused neurons; None keeps the parents' width.
        stream: the grouping of the residual stream this level adds into, reused as it is.
    """
    config, weights = context.config, context.weights
    if is_output:
        scores = weights.classes.flatten()
        shares = shares_by_index(weights.classes)
        return LevelGrouping(
            "index",
            shares,
            scores,
            torch.ones(shares.shape[1], dtype=torch.float64),
            grouping_cost(gram, sums, rows, scores, shares),
        )
    if stream is not None:
        cost = grouping_cost(gram, sums, rows, stream.scores, stream.shares)
        return LevelGrouping("stream", stream.shares, stream.scores, stream.group_weights, cost)
    clock = time.perf_counter()
    width = gram.shape[0] // len(context.parents)
    scores = torch.cat(
        [
            importance_scores(
                config.importance,
                parent,
                module,
                width,
                context.calibration,
                context.dtype,
                config.conductance_steps,
            )
            * weight
            for parent, module, weight in zip(context.parents, scored_modules, weights.parents)
        ]
    )
    importance_seconds = time.perf_counter() - clock
    clock = time.perf_counter()
    found = group_neurons(
        config.grouping,
        gram,
        sums,
        rows,
        scores,
        width,
        groups or width,
        seed=config.seed,
        n_init=config.kmeans_n_init,
        max_iter=config.kmeans_max_iter,
    )
    group_weights = (scores[:, None] * (found.shares > 0)).sum(0)
    return LevelGrouping(
        config.grouping,
        found.shares,
        scores,
        group_weights,
        found.cost,
        importance_seconds,
        time.perf_counter() - clock,
    )
