"""The linear variant: each level fitted in closed form by ridge least squares, from statistics streamed
over the calibration set (see `fedfuse.fusion.statistics`)."""

from __future__ import annotations

import time
import warnings

import torch
from torch import nn

from fedfuse.fusion.context import FusionContext
from fedfuse.fusion.fitting import solve_level, write_level
from fedfuse.fusion.levels import Level, Point
from fedfuse.fusion.report import LevelReport
from fedfuse.fusion.statistics import LevelStatistics, layer_inputs, rows_of
from fedfuse.fusion.targets import group_space, measure_points


def fit_linear(level: Level, context: FusionContext) -> LevelReport:
    """Fit one Linear/Conv level (BatchNorm folded in) in closed form and write it into the fused model."""
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    fused_level = context.fused_level(level)
    assert fused_level.layer is not None
    layer = context.fused.get_submodule(fused_level.layer)
    norm = context.fused.get_submodule(fused_level.norm) if fused_level.norm else None
    stats = _statistics(level, layer, context)
    seconds["statistics"] = time.perf_counter() - clock

    space = context.plan.spaces[level.space]
    grouping = context.groupings.get(space.name)
    method = "stream" if grouping is not None else None
    if grouping is None:
        clock = time.perf_counter()
        own = space.points == (Point(level.target, level.axis),)
        grams = [stats.z] if own else measure_points(space, context)
        seconds["statistics"] += time.perf_counter() - clock
        grouping = context.groupings[space.name] = group_space(space, grams, context)
        seconds["importance"], seconds["grouping"] = grouping.importance_seconds, grouping.grouping_seconds

    clock = time.perf_counter()
    with_bias = layer.bias is not None or norm is not None
    fit = solve_level(stats, grouping.shares.to(context.device), context.config.ridge, with_bias)
    if fit.rank < fit.live:
        warnings.warn(
            f"level '{level.name}': the {stats.rows} calibration rows span only {fit.rank} of the {fit.live} "
            f"dimensions of its inputs that are ever non-zero (rank {fit.rank}); the fit is underdetermined"
            + (
                f" and the ridge ({context.config.ridge:g}) keeps it well-posed"
                if context.config.ridge > 0
                else " and the minimum-norm solution is taken"
            )
            + ". A larger or more varied calibration set fits better.",
            stacklevel=4,  # the caller of fuse()
        )
    write_level(layer, norm, fit)
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
    )


def _statistics(level: Level, layer: nn.Module, context: FusionContext) -> LevelStatistics:
    """One pass: the fused model's inputs to the level (and residual terms) against every parent's values
    at the level's target."""
    stats: LevelStatistics | None = None
    places = [level.input, *level.residual]
    with torch.no_grad():
        for inputs, _ in context.calibration.batches(context.device, context.dtype):
            fused_input, *terms = context.fused_reader.read(context.fused, inputs, places)
            x = layer_inputs(layer, fused_input)
            z = torch.cat(
                [
                    rows_of(context.parent_reader.read(parent, inputs, [level.target])[0], level.axis)
                    for parent in context.parents
                ],
                dim=1,
            )
            r = rows_of(torch.stack(terms).sum(0), level.axis) if terms else None
            if stats is None:
                width = context.fused_level(level).width
                stats = LevelStatistics(x.shape[1], z.shape[1], width, context.device)
            stats.add(x, z, r)
    assert stats is not None  # CalibrationSet guarantees a non-empty set
    return stats
