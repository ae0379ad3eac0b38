"""The linear variant: each level fitted in closed form by least squares pulled toward its prior, from
statistics streamed over the calibration set (see `fedfuse.fusion.statistics`)."""

from __future__ import annotations

import statistics as stats_
import time
import warnings

import torch
from torch import nn

from fedfuse.fusion.context import FusionContext
from fedfuse.fusion.fitting import solve_level, write_level
from fedfuse.fusion.levels import Level, Point
from fedfuse.fusion.prior import aligned_prior, folded_weights, weight_norm
from fedfuse.fusion.report import LevelReport
from fedfuse.fusion.statistics import LevelStatistics, layer_inputs, rows_of
from fedfuse.fusion.targets import SpaceGrouping, class_targets, group_space, measure_points, output_target


def fit_linear(level: Level, context: FusionContext) -> LevelReport:
    """Fit one Linear/Conv level (BatchNorm folded in) in closed form and write it into the fused model."""
    seconds: dict[str, float] = {}
    config = context.config
    fused_level = context.fused_level(level)
    assert fused_level.layer is not None and level.layer is not None
    layer = context.fused.get_submodule(fused_level.layer)
    norm = context.fused.get_submodule(fused_level.norm) if fused_level.norm else None
    space = context.plan.spaces[level.space]
    grouping = context.groupings.get(space.name)
    method = "stream" if grouping is not None else None
    if grouping is None and space.fixed:
        grouping = context.groupings[space.name] = group_space(space, [], context)
        seconds["importance"] = grouping.importance_seconds
    # Label and log-probability targets of the classes are no linear mix of the parents' logits: they are
    # computed per batch, and the shares that mix the logits are then 0.
    direct = output_target(context) if space.classes and output_target(context) != "logits" else None

    clock = time.perf_counter()
    stats = _statistics(level, layer, context, grouping if direct else None, direct)
    seconds["statistics"] = time.perf_counter() - clock
    if grouping is None:
        clock = time.perf_counter()
        own = space.points == (Point(level.target, level.axis),)
        grams = [stats.z] if own else measure_points(space, context)
        seconds["statistics"] += time.perf_counter() - clock
        grouping = context.groupings[space.name] = group_space(space, grams, context)
        seconds["importance"], seconds["grouping"] = grouping.importance_seconds, grouping.grouping_seconds

    clock = time.perf_counter()
    with_bias = layer.bias is not None or norm is not None
    parent_maps = [folded_weights(parent, level.layer, level.norm) for parent in context.parents]
    prior = aligned_prior(level, grouping, parent_maps, context, with_bias)
    shares = grouping.shares.to(context.device)
    fit = solve_level(stats, torch.zeros_like(shares) if direct else shares, config.ridge, with_bias, prior)
    if fit.rank < fit.live:
        warnings.warn(
            f"level '{level.name}': the {stats.rows} calibration rows span only {fit.rank} of the {fit.live} "
            f"dimensions of its inputs that are ever non-zero (rank {fit.rank}); the fit is underdetermined"
            + (
                f" and is pulled toward its prior (ridge {config.ridge:g})"
                if config.ridge > 0
                else " and the solution nearest its prior is taken"
            )
            + ". A larger or more varied calibration set fits better.",
            stacklevel=4,  # the caller of fuse()
        )
    write_level(layer, norm, fit.weight, fit.bias, fit.output_mean, fit.output_var)
    seconds["solve"] = time.perf_counter() - clock
    return LevelReport(
        name=level.name,
        kind=level.kind,
        neurons=fused_level.width,
        fan_in=fit.fan_in,
        rows=stats.rows,
        grouping=method or grouping.method,
        grouping_cost=grouping.cost(stats.z),
        fit_r2=fit.r2,
        seconds=seconds,
        space=level.space,
        rank=fit.rank,
        live_inputs=fit.live,
        weight_norm=float(fit.weight.norm()),
        parent_weight_norm=stats_.mean(weight_norm(weights, with_bias) for weights in parent_maps),
    )


def _statistics(
    level: Level, layer: nn.Module, context: FusionContext, grouping: SpaceGrouping | None, direct: str | None
) -> LevelStatistics:
    """One pass: the fused model's inputs to the level against every parent's values at the level's target,
    with the targets' offset: minus the fused residual terms, plus the whole target of the classes when it
    is no mix of the parents' logits (``direct``: `class_targets`)."""
    stats: LevelStatistics | None = None
    places = [level.input, *level.residual]
    parents = len(context.parents)
    with torch.no_grad():
        for inputs, labels in context.calibration.batches(context.device, context.dtype):
            fused_input, *terms = context.fused_reader.read(context.fused, inputs, places)
            x = layer_inputs(layer, fused_input)
            z = torch.cat(
                [
                    rows_of(context.parent_reader.read(parent, inputs, [level.target])[0], level.axis)
                    for parent in context.parents
                ],
                dim=1,
            )
            offset = -rows_of(torch.stack(terms).sum(0), level.axis) if terms else None
            if direct is not None and grouping is not None:
                target = class_targets(direct, z, labels, grouping, parents)
                offset = target if offset is None else target + offset
            if stats is None:
                width = context.fused_level(level).width
                stats = LevelStatistics(x.shape[1], z.shape[1], width, context.device)
            stats.add(x, z, offset)
    assert stats is not None  # CalibrationSet guarantees a non-empty set
    return stats
