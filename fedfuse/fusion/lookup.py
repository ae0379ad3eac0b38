"""Embedding tables (``nn.Embedding`` on the input's token ids): fitted exactly by the aligned average.

A fused embedding's neuron g (an embedding dimension) is asked, at every occurrence of token t, for its
group's target: the shares' mix of the members' entries for t. That mix is a row of the aligned
average of the members' tables (`fedfuse.fusion.prior.aligned_average`), the same for every occurrence,
so the aligned average is the least-squares fit, with no error, for every token the calibration set
holds, and, for the tokens it does not hold, what a fit pulled toward the parents keeps: nothing is left
to solve, and both variants write it.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING

import torch

from fedfuse.fusion.levels import Level
from fedfuse.fusion.prior import aligned_average, folded_weights, weight_norm
from fedfuse.fusion.report import LevelReport

if TYPE_CHECKING:
    from fedfuse.fusion.context import FusionContext
    from fedfuse.fusion.targets import SpaceGrouping


def fit_lookup(
    level: Level, grouping: SpaceGrouping, method: str, seconds: dict[str, float], context: FusionContext
) -> LevelReport:
    """Write the aligned average of the parents' tables into the fused embedding ``level``."""
    assert level.layer is not None
    clock = time.perf_counter()
    tables = [folded_weights(parent, level.layer, None) for parent in context.parents]  # [D, V] each
    average = aligned_average(tables, grouping.shares, None, 0, with_bias=False)  # [V, g]
    table = context.fused.get_submodule(context.fused_level(level).layer)
    with torch.no_grad():
        table.weight.copy_(average)
    seconds["solve"] = time.perf_counter() - clock
    return LevelReport(
        name=level.name,
        kind=level.kind,
        neurons=average.shape[1],
        fan_in=average.shape[0],
        rows=0,  # no rows are read: the fit is exact by construction
        grouping=method or grouping.method,
        grouping_cost=grouping.costs[level.target],
        fit_r2=1.0,
        seconds=seconds,
        space=level.space,
        weight_norm=float(average.norm()),
        parent_weight_norm=statistics.mean(weight_norm(t, with_bias=False) for t in tables),
    )
