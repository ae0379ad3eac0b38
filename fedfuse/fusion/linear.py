"""The linear variant: each level fitted in closed form by ridge least squares, from statistics
streamed over the calibration set (see `fedfuse.fusion.statistics`)."""

from __future__ import annotations

import time
import warnings

import torch
from torch import nn

from fedfuse.fusion.context import FusionContext
from fedfuse.fusion.fitting import fit_level, write_level
from fedfuse.fusion.level_grouping import group_level
from fedfuse.fusion.levels import Leaves, Level, leaves_of
from fedfuse.fusion.report import LevelReport
from fedfuse.fusion.statistics import LevelStatistics, layer_inputs, neuron_values


class LinearFusion:
    """The per-level work of one linear-variant `fuse` call: its parents, fused model and calibration set."""

    def __init__(self, context: FusionContext) -> None:
        self.context = context
        self.parent_leaves = [leaves_of(parent) for parent in context.parents]
        self.fused_leaves: Leaves = leaves_of(context.fused)

    def fuse_level(self, index: int, level: Level, is_output: bool, groups: int | None) -> LevelReport:
        seconds: dict[str, float] = {}
        clock = time.perf_counter()
        layer = self.fused_leaves.module(level.name)
        stats = self._statistics(level, layer)
        seconds["statistics"] = time.perf_counter() - clock

        grouping = group_level(
            stats.ztz.cpu(),
            stats.z_sum.cpu(),
            stats.rows,
            context=self.context,
            scored_modules=[leaves.module(level.norm or level.name) for leaves in self.parent_leaves],
            is_output=is_output,
            groups=groups,
        )
        seconds["importance"], seconds["grouping"] = grouping.importance_seconds, grouping.grouping_seconds

        clock = time.perf_counter()
        norm = self.fused_leaves.module(level.norm) if level.norm else None
        with_bias = layer.bias is not None or norm is not None
        fan_in = stats.xtx.shape[0] + int(with_bias)
        ill_posed = stats.rows < fan_in
        if ill_posed:
            remedy = (
                f"the ridge ({self.context.config.ridge}) keeps it well-posed"
                if self.context.config.ridge > 0
                else "the minimum-norm solution is taken"
            )
            warnings.warn(
                f"level '{level.name}': {stats.rows} calibration rows for a fan-in of {fan_in}; the fit is "
                f"underdetermined and {remedy}. A larger calibration set fits better.",
                stacklevel=4,  # the caller of fuse()
            )
        fit = fit_level(stats, grouping.shares.to(self.context.device), self.context.config.ridge, with_bias)
        write_level(layer, norm, fit)
        seconds["solve"] = time.perf_counter() - clock
        return LevelReport(
            name=level.name,
            kind=level.kind,
            neurons=grouping.shares.shape[1],
            fan_in=fan_in,
            rows=stats.rows,
            grouping=grouping.method,
            grouping_cost=grouping.cost,
            fit_r2=fit.r2,
            seconds=seconds,
            ill_posed=ill_posed,
        )

    def _statistics(self, level: Level, layer: nn.Module) -> LevelStatistics:
        """One pass: the fused model's inputs to the level against every parent's neuron values."""
        stats: LevelStatistics | None = None
        with torch.no_grad():
            for inputs, _ in self.context.calibration.batches(self.context.device, self.context.dtype):
                x = layer_inputs(layer, self.fused_leaves.run(inputs, 0, level.start))
                z = torch.cat(
                    [
                        neuron_values(level, leaves.run(inputs, 0, level.stop))
                        for leaves in self.parent_leaves
                    ],
                    dim=1,
                )
                if stats is None:
                    stats = LevelStatistics(x.shape[1], z.shape[1], self.context.device)
                stats.add(x, z)
        assert stats is not None  # CalibrationSet guarantees a non-empty set
        return stats
