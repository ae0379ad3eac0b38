"""A space's grouping: how its K·n parent neurons make its fused neurons, decided once per space.

Free spaces are grouped by importance-weighted k-means (or Hungarian matching for two parents) on the
parents' neuron values at the space's points (`fedfuse.fusion.levels.Space`): one level's outputs, or
every level output and residual sum of a stream, each point weighted by the inverse of its total
variance so that every point counts alike. Fixed spaces (the classes) are grouped by index: class c of
every parent makes fused class c, weighted per class. The group targets are T = Z·shares.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fedfuse.fusion.clustering import group_neurons, grouping_cost, shares_by_index
from fedfuse.fusion.importance import importance_scores
from fedfuse.fusion.levels import Space
from fedfuse.fusion.statistics import NeuronGram, rows_of

if TYPE_CHECKING:
    from fedfuse.fusion.context import FusionContext


@dataclass(frozen=True)
class SpaceGrouping:
    """How a space's K·n parent neurons make its fused neurons.

    Attributes:
        method: ``"kmeans"``, ``"hungarian"`` or ``"index"`` (fixed spaces: the classes).
        shares: ``[K·n, groups]``: the group targets are T = Z·shares (columns sum to 1).
        scores: ``[K·n]`` the neurons' importance, parent weights included.
        group_weights: ``[groups]`` S_k, the total importance of each group.
        importance_seconds, grouping_seconds: where the time went.
    """

    method: str
    shares: Tensor
    scores: Tensor
    group_weights: Tensor
    importance_seconds: float = 0.0
    grouping_seconds: float = 0.0

    def cost(self, gram: NeuronGram) -> float:
        """The share of the neurons' variance that merging loses, at the place ``gram`` measured."""
        assert gram.gram is not None
        return grouping_cost(gram.gram.cpu(), gram.variances.cpu(), self.scores, self.shares)


def measure_points(space: Space, context: FusionContext) -> list[NeuronGram]:
    """One pass of the parents over the calibration set: the Gram matrix of their neurons at each point."""
    grams = [NeuronGram() for _ in space.points]
    places = [point.place for point in space.points]
    with torch.no_grad():
        for inputs, _ in context.calibration.batches(context.device, context.dtype):
            values = [context.parent_reader.read(parent, inputs, places) for parent in context.parents]
            for index, (gram, point) in enumerate(zip(grams, space.points)):
                gram.add(torch.cat([rows_of(parent[index], point.axis) for parent in values], dim=1))
    return grams


def group_space(space: Space, grams: Sequence[NeuronGram], context: FusionContext) -> SpaceGrouping:
    """Decide ``space``'s grouping from its points' Gram matrices (``grams``, one per point)."""
    parents = len(context.parents)
    weights = context.weights
    if space.fixed:
        per_class = (
            weights.classes
            if space.classes
            else (weights.parents / weights.parents.sum()).unsqueeze(1).expand(parents, space.width)
        )
        shares = shares_by_index(per_class)
        return SpaceGrouping(
            "index", shares, per_class.flatten(), torch.ones(space.width, dtype=torch.float64)
        )
    clock = time.perf_counter()
    scores = _scores(space, context) * weights.parents.repeat_interleave(space.width)
    importance_seconds = time.perf_counter() - clock
    clock = time.perf_counter()
    gram, variances = _combined(grams)
    config = context.config
    found = group_neurons(
        config.grouping,
        gram,
        variances,
        scores,
        space.width,
        context.groups(space.name),
        seed=config.seed,
        n_init=config.kmeans_n_init,
        max_iter=config.kmeans_max_iter,
    )
    group_weights = (scores[:, None] * (found.shares > 0)).sum(0)
    return SpaceGrouping(
        config.grouping, found.shares, scores, group_weights, importance_seconds, time.perf_counter() - clock
    )


def _combined(grams: Sequence[NeuronGram]) -> tuple[Tensor, Tensor]:
    """One Gram matrix (and per-neuron variances) for several points, each scaled by the inverse of its
    total variance: k-means on the neurons' values at every point at once, each point counting alike."""
    if len(grams) == 1:
        assert grams[0].gram is not None
        return grams[0].gram.cpu(), grams[0].variances.cpu()
    gram = variances = None
    for point in grams:
        assert point.gram is not None
        scale = 1.0 / float(point.variances.sum().clamp_min(torch.finfo(torch.float64).tiny))
        gram = point.gram * scale if gram is None else gram + point.gram * scale
        variances = point.variances * scale if variances is None else variances + point.variances * scale
    assert gram is not None and variances is not None
    return gram.cpu(), variances.cpu()


def _scores(space: Space, context: FusionContext) -> Tensor:
    """``[K·n]`` importance of the parents' neurons: per point, normalised to mean 1 over all parents'
    neurons there, averaged over the space's points."""
    config = context.config
    if config.importance == "uniform":
        return torch.ones(len(context.parents) * space.width, dtype=torch.float64)
    total = torch.zeros(len(context.parents) * space.width, dtype=torch.float64)
    for point in space.points:
        per_parent = []
        for parent in context.parents:
            forward, module = context.parent_reader.attribution_target(parent, point.place)
            per_parent.append(
                importance_scores(
                    config.importance,
                    forward,
                    module,
                    point.axis,
                    space.width,
                    context.calibration,
                    context.dtype,
                    config.conductance_steps,
                )
            )
        scores = torch.cat(per_parent)
        total += scores / scores.mean()
    return total / len(space.points)
