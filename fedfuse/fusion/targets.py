"""A space's grouping: how its K·n parent neurons make its fused neurons, decided once per space.

Free spaces are grouped by importance-weighted k-means (or Hungarian matching for two parents) on the
parents' neuron values at the space's points (`fedfuse.fusion.levels.Space`): one level's outputs, or
every level output and residual sum of a stream, each point weighted by the inverse of its total
variance so that every point counts alike. Fixed spaces (the classes) are grouped by index: class c of
every parent makes fused class c, weighted per class (`fedfuse.fusion.weights`) and, as in the paper,
by each parent's importance score for that class neuron. The group targets are T = Z·shares; the
classes may instead be fitted to the calibration labels or to the log of the class-weighted mix of the
parents' probabilities (`class_targets`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from fedfuse.fusion.clustering import group_neurons, grouping_cost, shares_by_index
from fedfuse.fusion.embedding import NeuronEmbedding
from fedfuse.fusion.importance import ONE_PASS_FOR_MANY, importance_scores
from fedfuse.fusion.levels import Point, Space
from fedfuse.fusion.statistics import rows_of

if TYPE_CHECKING:
    from fedfuse.fusion.context import FusionContext


@dataclass(frozen=True)
class SpaceGrouping:
    """How a space's K·n parent neurons make its fused neurons.

    Neurons are grouped by the direction of their values, each rescaled to unit root mean square
    (``scales``), and each group target is the importance-weighted mean of its members so rescaled, times
    the members' mean scale. A ReLU network computes the same function when a neuron's weights are
    scaled by a positive factor and the next layer's inputs from it by the inverse, so a parent's raw
    scale says nothing of what a neuron computes: grouping raw values would let one parent with large
    activations take a group per neuron and leave the others crowded into the rest.

    Attributes:
        method: ``"kmeans"``, ``"hungarian"`` or ``"index"`` (fixed spaces: the classes).
        shares: ``[K·n, groups]``: the group targets are T = Z·shares.
        unit_shares: ``[K·n, groups]``: the same groups over the rescaled neurons Z·diag(1/scales)
            (each column sums to 1: the members' weights s_j / S_k).
        scales: ``[K·n]`` each neuron's root mean square (ones for index groupings).
        group_scales: ``[groups]`` each group target's scale: its members' weighted mean scale.
        scores: ``[K·n]`` the neurons' importance, parent weights included.
        group_weights: ``[groups]`` S_k, the total importance of each group.
        costs: by place (each of the space's points), the importance-weighted share of the rescaled
            neurons' variance that merging loses there: Σ_j s_j‖z_j − T_a(j)‖² / Σ_j s_j‖z_j − z̄_j‖²,
            measured on the points grouping worked on (exact but for a sketch).
        importance_seconds, grouping_seconds: where the time went.
    """

    method: str
    shares: Tensor
    unit_shares: Tensor
    scales: Tensor
    group_scales: Tensor
    scores: Tensor
    group_weights: Tensor
    costs: dict[str, float]
    importance_seconds: float = 0.0
    grouping_seconds: float = 0.0


def measure_points(space: Space, context: FusionContext, keep_targets: bool = False) -> list[NeuronEmbedding]:
    """One pass of the parents over the calibration set: their neurons embedded at each point; with
    ``keep_targets``, the values at a stream's targets kept for its levels' fits
    (`FusionContext.collecting_targets`)."""
    config = context.config
    embeddings = [
        NeuronEmbedding(context.calibration.num_samples, config.grouping_dims, config.seed + index)
        for index in range(len(space.points))
    ]
    places = [point.place for point in space.points]
    collected = context.collecting(places[0]) if len(places) == 1 else None
    targets = context.collecting_targets(space) if keep_targets else {}
    with torch.no_grad():
        for inputs, _, at in context.chunks(places):
            values = [context.parent_reader.read(parent, inputs, places, at) for parent in context.parents]
            if collected is not None:
                for parent, value in zip(context.parents, values):
                    collected.add(parent, at, value[0])
            for place, kept in targets.items():
                for parent, value in zip(context.parents, values):
                    kept.add(parent, at, value[places.index(place)])
            for index, (embedding, point) in enumerate(zip(embeddings, space.points)):
                embedding.add(
                    torch.cat([rows_of(parent[index], point.axis) for parent in values], dim=1), len(inputs)
                )
    context.keep(collected, places[0])
    context.keep_targets(targets)
    return embeddings


def group_space(space: Space, embeddings: Sequence[NeuronEmbedding], context: FusionContext) -> SpaceGrouping:
    """Decide ``space``'s grouping from its points' embeddings (``embeddings``, one per point; fixed spaces
    need none)."""
    parents = len(context.parents)
    weights = context.weights
    if space.fixed:
        clock = time.perf_counter()
        if space.classes:
            per_class = weights.classes
            if context.config.importance != "uniform":
                scored = per_class * _scores(space, context).reshape(parents, space.width)
                per_class = scored / scored.sum(dim=0, keepdim=True)
        else:
            per_class = (weights.parents / weights.parents.sum()).unsqueeze(1).expand(parents, space.width)
        shares = shares_by_index(per_class)
        ones = torch.ones(shares.shape[0], dtype=torch.float64)
        return SpaceGrouping(
            "index",
            shares,
            shares,
            ones,
            torch.ones(shares.shape[1], dtype=torch.float64),
            per_class.flatten(),
            torch.ones(space.width, dtype=torch.float64),
            _costs(space, embeddings, ones, per_class.flatten(), shares),
            importance_seconds=time.perf_counter() - clock,
        )
    clock = time.perf_counter()
    scores = _scores(space, context) * weights.parents.repeat_interleave(space.width)
    importance_seconds = time.perf_counter() - clock
    clock = time.perf_counter()
    points, energy = _combined(embeddings)
    scales = energy.clamp_min(energy.max().clamp_min(torch.finfo(torch.float64).tiny) * 1e-12).sqrt()
    inverse = 1.0 / scales
    config = context.config
    unit_shares = group_neurons(
        config.grouping,
        points * inverse[:, None],
        scores,
        space.width,
        context.groups(space.name),
        init=config.kmeans_init,
        variance=config.grouping_variance,
        seed=config.seed,
        n_init=config.kmeans_n_init,
        max_iter=config.kmeans_max_iter,
    )
    group_scale = scales @ unit_shares  # [groups] the members' weighted mean scale
    shares = unit_shares * inverse[:, None] * group_scale[None, :]
    group_weights = (scores[:, None] * (unit_shares > 0)).sum(0)
    return SpaceGrouping(
        config.grouping,
        shares,
        unit_shares,
        scales,
        group_scale,
        scores,
        group_weights,
        _costs(space, embeddings, scales, scores, unit_shares),
        importance_seconds,
        time.perf_counter() - clock,
    )


#: Label smoothing of the ``"labels"`` output target: the true class's logit then exceeds the others'
#: by log(0.9 · (C - 1) / 0.1), about 4.4 for ten classes, the margin of a confident classifier.
LABEL_SMOOTHING = 0.1


def output_target(context: FusionContext) -> str:
    """The classes' target for this fusion: the configured one (``"labels"`` for ``"auto"``), or
    ``"logits"`` for ``"labels"`` when the calibration set has none."""
    target = context.config.output_target
    if target == "auto":  # chosen by cross-validation where the linear variant fits the head (`fit_linear`)
        target = "labels"
    return "logits" if target == "labels" and not context.calibration.has_labels else target


def class_targets(
    kind: str, values: Tensor, labels: Tensor | None, grouping: SpaceGrouping, parents: int
) -> Tensor | None:
    """``[rows, C]`` targets of the classes that are no linear mix of the parents' logits ``values``
    (``[rows, K·C]``): ``"labels"`` (`label_logits`) or ``"log_probabilities"`` (`log_mixture`);
    None for ``"logits"`` (the grouping's shares mix them).

    Raises:
        ValueError: label targets for outputs with more rows than samples (not one logit vector each).
    """
    if kind == "log_probabilities":
        return log_mixture(values, grouping.shares.to(values.device), parents)
    if kind == "labels":
        assert labels is not None
        if len(labels) != values.shape[0]:
            raise ValueError(
                f"output_target='labels' needs one output row per sample; the classes have {values.shape[0]} "
                f"rows for {len(labels)} samples. Use output_target='logits'"
            )
        return label_logits(labels, values.shape[1] // parents).to(values.device)
    return None


def label_logits(labels: Tensor, classes: int) -> Tensor:
    """``[N, C]`` the log of label-smoothed one-hot vectors, centred (logits are defined up to a shift)."""
    smoothed = torch.full((len(labels), classes), LABEL_SMOOTHING / (classes - 1), dtype=torch.float64)
    smoothed[torch.arange(len(labels)), labels.cpu()] = 1 - LABEL_SMOOTHING
    logits = smoothed.log()
    return logits - logits.mean(dim=1, keepdim=True)


def log_mixture(values: Tensor, shares: Tensor, parents: int) -> Tensor:
    """``[rows, C]`` log Σ_k w_kc · softmax(z_k)_c: the class-weighted softmax ensemble's log-probabilities,
    from the parents' logits ``values`` ``[rows, K·C]`` and the index grouping's ``shares`` (w_kc)."""
    classes = values.shape[1] // parents
    log_probabilities = torch.log_softmax(values.double().reshape(-1, parents, classes), dim=2)
    weights = shares.sum(dim=1).reshape(parents, classes).to(log_probabilities)
    return torch.logsumexp(log_probabilities + weights.clamp_min(1e-300).log(), dim=1)


#: Energy over variance (Σz² / Σ(z − z̄)²) past which a point of a stream counts as nearly constant
#: (its values' mean over ten standard deviations): `_combined` magnifies it no further.
NEARLY_CONSTANT = 100.0


def _combined(embeddings: Sequence[NeuronEmbedding]) -> tuple[Tensor, Tensor]:
    """One set of points (with per-neuron energies Σz²) for several points of a space, each
    scaled by the inverse root of its total variance and set side by side: k-means on the neurons'
    values at every point at once, each point counting alike.

    A point whose values barely move from sample to sample (a squeeze-and-excitation gate's, energy
    7,000 times its variance) would have its means magnified until they outweighed every other point,
    and k-means grouped by them alone (permuted copies came back mismatched); so a point's energy is
    magnified at most `NEARLY_CONSTANT` times. Ordinary points stay below it (ResNet-8's 2.6-4.5,
    ViT's 4-14, MobileNet's about 2), and are scaled by their variance as before: scaled by their
    energy instead, ViT fused 1.5-3.4 points worse."""
    points, energies = [], []
    for point in embeddings:
        assert point.squares is not None
        spread = torch.maximum(point.variances.sum(), point.squares.sum() / NEARLY_CONSTANT)
        scale = 1.0 / float(spread.clamp_min(torch.finfo(torch.float64).tiny))
        if len(embeddings) == 1:
            scale = 1.0
        points.append(point.points() * scale**0.5)
        energies.append(point.squares.cpu() * scale)
    return torch.cat(points, dim=1), sum(energies[1:], energies[0])


def _costs(
    space: Space, embeddings: Sequence[NeuronEmbedding], scales: Tensor, scores: Tensor, unit_shares: Tensor
) -> dict[str, float]:
    """`SpaceGrouping.costs`: the grouping's cost at each of the space's points, on rescaled neurons."""
    inverse = 1.0 / scales
    return {
        point.place: grouping_cost(
            embedding.points(), embedding.variances.cpu() * inverse**2, scores, unit_shares, inverse
        )
        for point, embedding in zip(space.points, embeddings)
    }


def _scores(space: Space, context: FusionContext) -> Tensor:
    """``[K·n]`` importance of the parents' neurons: per point, each parent's scores normalised to mean 1
    over its own neurons, then averaged over the space's points.

    Importance says which of a parent's neurons matter; how much a parent counts is its weight's job
    (`fedfuse.fusion.weights`, measured on the calibration set), by which the caller multiplies. Scores
    compared across parents would let a parent count more by being larger: gradient × activation of a
    ReLU network whose weights are scaled by c is c times larger, so a client that scaled its model up
    (by less than screening's limit) would have pulled every group toward its neurons."""
    if context.config.importance == "uniform":
        return torch.ones(len(context.parents) * space.width, dtype=torch.float64)
    total = torch.zeros(len(context.parents) * space.width, dtype=torch.float64)
    for point in space.points:
        per_parent = [_parent_scores(parent, point, space.width, context) for parent in context.parents]
        total += torch.cat([scores / scores.mean() for scores in per_parent])
    return total / len(space.points)


def _parent_scores(parent: nn.Module, point: Point, width: int, context: FusionContext) -> Tensor:
    """``[n]`` one parent's importance scores at ``point``. A method that scores many places in one pass
    (`fedfuse.fusion.importance.ONE_PASS_FOR_MANY`) scores every place the fusion will ask about the
    first time one is asked (the points of every space grouped by importance), and keeps them
    (`FusionContext.importance`): a parent then runs forward and backward once per batch, not once per
    place (ten small CNNs: 5.4 → 2.6-3.2 s, against 1.6-1.8 s for uniform scores)."""
    key = (id(parent), point.place)
    if key not in context.importance:
        config = context.config
        wanted = [(point, width)]
        if config.importance in ONE_PASS_FOR_MANY:
            wanted = [
                (other, space.width)
                for space in context.plan.spaces.values()
                if space.classes or not space.fixed
                for other in space.points
            ]
            wanted = list({other.place: (other, n) for other, n in wanted}.values())
        forward, modules = context.parent_reader.attribution_targets(parent, [p.place for p, _ in wanted])
        found = importance_scores(
            config.importance,
            forward,
            modules,
            [p.axis for p, _ in wanted],
            [n for _, n in wanted],
            context.calibration,
            context.dtype,
            config.conductance_steps,
        )
        for (other, _), scores in zip(wanted, found):
            context.importance[(id(parent), other.place)] = scores
    return context.importance[key]
