"""The linear variant: each level fitted in closed form by least squares pulled toward its prior, from
statistics streamed over the calibration set (see `fedfuse.fusion.statistics`)."""

from __future__ import annotations

import statistics as stats_
import time
import warnings
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor, nn

from fedfuse.fusion.context import FusionContext
from fedfuse.fusion.fitting import LevelFit, solve_channels, solve_level, write_level
from fedfuse.fusion.head_choice import CANDIDATES, HeadChoice, choose_head
from fedfuse.fusion.levels import Level
from fedfuse.fusion.lookup import fit_lookup
from fedfuse.fusion.per_channel import (
    aligned,
    parameter_features,
    shared,
    standardise,
    write_parameters,
)
from fedfuse.fusion.prior import aligned_prior, folded_weights, weight_norm
from fedfuse.fusion.report import LevelReport
from fedfuse.fusion.statistics import (
    ChannelStatistics,
    LevelStatistics,
    channel_inputs,
    layer_fan_in,
    layer_inputs,
    rows_of,
)
from fedfuse.fusion.targets import (
    SpaceGrouping,
    class_targets,
    group_space,
    measure_points,
    output_target,
)

#: The most values (float64) the output layer's features may hold for ``output_target="auto"`` to
#: cross-validate its target on them (128 MiB); past that it is fitted to the labels.
HEAD_CHOICE_VALUES = 1 << 24


def fit_linear(level: Level, context: FusionContext) -> LevelReport:
    """Fit one Linear/Conv level (BatchNorm folded in) in closed form and write it into the fused model."""
    seconds: dict[str, float] = {}
    config = context.config
    space = context.plan.spaces[level.space]
    grouping = context.groupings.get(space.name)
    method = "stream" if grouping is not None else None
    if grouping is None:
        clock = time.perf_counter()
        embeddings = measure_points(space, context, keep_targets=True)
        seconds["statistics"] = time.perf_counter() - clock
        grouping = context.groupings[space.name] = group_space(space, embeddings, context)
        seconds["importance"], seconds["grouping"] = grouping.importance_seconds, grouping.grouping_seconds
    if level.kind == "embedding":
        return fit_lookup(level, grouping, method or grouping.method, seconds, context)
    if level.kind == "per_channel":
        return _fit_per_channel(level, grouping, method or grouping.method, seconds, context)
    fused_level = context.fused_level(level)
    assert fused_level.layer is not None and level.layer is not None
    layer = context.fused.get_submodule(fused_level.layer)
    norm = context.fused.get_submodule(fused_level.norm) if fused_level.norm else None
    # Label and log-probability targets of the classes are no linear mix of the parents' logits: they are
    # computed per batch (`class_targets`).
    direct = output_target(context) if space.classes and output_target(context) != "logits" else None

    with_bias = layer.bias is not None or norm is not None
    parent_maps = [folded_weights(parent, level.layer, level.norm) for parent in context.parents]
    prior = aligned_prior(level, grouping, parent_maps, context, with_bias)

    clock = time.perf_counter()
    width = fused_level.width
    stats: LevelStatistics | ChannelStatistics = (
        ChannelStatistics(width, layer_fan_in(layer), context.device)
        if level.channelwise
        else LevelStatistics(layer_fan_in(layer), width, context.device)
    )
    unfold = channel_inputs if level.channelwise else layer_inputs
    choice = None
    if space.classes and context.config.output_target == "auto" and context.calibration.has_labels:
        choice = _choose_head(level, layer, grouping, context, with_bias, prior)
    if choice is not None:
        assert isinstance(stats, LevelStatistics)
        stats.add(choice[1], choice[2])
    else:
        _statistics(level, stats, lambda inputs: (unfold(layer, inputs), None), context, grouping, direct)
    seconds["statistics"] = seconds.get("statistics", 0.0) + time.perf_counter() - clock

    clock = time.perf_counter()
    if isinstance(stats, ChannelStatistics):
        fit = solve_channels(stats, config.ridge, with_bias, prior)
    else:
        fit = solve_level(stats, config.ridge, with_bias, prior)
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
    parent_norm = stats_.mean(weight_norm(weights, with_bias) for weights in parent_maps)
    report = _report(
        level,
        fused_level.width,
        fit.fan_in,
        stats.rows,
        method or grouping.method,
        grouping,
        seconds,
        fit,
        parent_norm,
    )
    if choice is not None:
        report = replace(report, output_target=choice[0].target, target_accuracy=choice[0].accuracy)
    return report


class _Rows:
    """The rows a pass of `_statistics` adds, kept: ``[rows, g]`` targets, and ``[rows, d]`` features when
    asked (one pass keeps them; they are the same in every pass)."""

    def __init__(self, features: bool) -> None:
        self.features: list[Tensor] | None = [] if features else None
        self.targets: list[Tensor] = []

    def add(self, x: Tensor, t: Tensor) -> None:
        if self.features is not None:
            self.features.append(x.reshape(-1, x.shape[-1]).double())
        self.targets.append(t.double())


def _choose_head(
    level: Level,
    layer: nn.Module,
    grouping: SpaceGrouping,
    context: FusionContext,
    with_bias: bool,
    prior: Tensor | None,
) -> tuple[HeadChoice, Tensor, Tensor] | None:
    """With ``output_target="auto"``: the output layer's target chosen by cross-validation on the
    calibration set (`fedfuse.fusion.head_choice`), and its rows (features ``[N, d]``, targets ``[N, C]``)
    to fit on. None, for the labels' fit (`output_target`), when the layer has more rows than samples (a
    convolution's positions) or its features would hold more than `HEAD_CHOICE_VALUES` values."""
    labels = torch.cat([y for _, y in context.calibration.batches(context.device, context.dtype)])
    if len(labels) * (layer_fan_in(layer) + 1) > HEAD_CHOICE_VALUES:
        return None
    features, targets = None, {}
    for name in sorted(CANDIDATES, key=lambda name: name != "logits"):  # the logits need no row per sample
        rows = _Rows(features=features is None)
        direct = None if name == "logits" else name
        _statistics(level, rows, lambda x: (layer_inputs(layer, x), None), context, grouping, direct)
        if rows.features is not None:
            features = torch.cat(rows.features)
        targets[name] = torch.cat(rows.targets)
        if len(targets[name]) != len(labels):
            return None
    assert features is not None
    choice = choose_head(features, targets, labels, context.config.ridge, with_bias, prior)
    return choice, features, targets[choice.target]


def _report(
    level: Level,
    neurons: int,
    fan_in: int,
    rows: int,
    method: str,
    grouping: SpaceGrouping,
    seconds: dict[str, float],
    fit: LevelFit,
    parent_weight_norm: float,
) -> LevelReport:
    """The report of a level solved in closed form."""
    return LevelReport(
        name=level.name,
        kind=level.kind,
        neurons=neurons,
        fan_in=fan_in,
        rows=rows,
        grouping=method,
        grouping_cost=grouping.costs[level.target],
        fit_r2=fit.r2,
        seconds=seconds,
        space=level.space,
        rank=fit.rank,
        live_inputs=fit.live,
        weight_norm=float(fit.weight.norm()),
        parent_weight_norm=parent_weight_norm,
    )


def _statistics(
    level: Level,
    stats: LevelStatistics | ChannelStatistics,
    rows: Callable[[Tensor], tuple[Tensor, Tensor | None]],
    context: FusionContext,
    grouping: SpaceGrouping,
    direct: str | None,
) -> None:
    """One pass adding to ``stats`` the fused model's inputs to the level, as ``rows`` makes them (with
    what the level adds of itself, subtracted from the targets), against its targets (the group targets,
    or the classes' own target when ``direct`` names one, `class_targets`; minus the fused residual
    terms)."""
    shares = grouping.shares.to(context.device, context.dtype).split(context.plan.spaces[level.space].width)
    places = [level.input, *level.residual]
    parents = len(context.parents)
    collected = context.collecting(level.target)
    kept = context.stream_targets.get(level.target)
    with torch.no_grad():
        for inputs, labels, at in context.chunks([*places, level.target]):
            fused_input, *terms = context.fused_reader.read(context.fused, inputs, places, at)
            outputs = [
                kept[id(parent)][at[0]][at[1]]
                if kept is not None
                else context.parent_reader.read(parent, inputs, [level.target], at)[0]
                for parent in context.parents
            ]
            if collected is not None:
                for parent, output in zip(context.parents, outputs):
                    collected.add(parent, at, output)
            values = [rows_of(output, level.axis) for output in outputs]
            if direct:  # the classes: one row per sample
                target = class_targets(direct, torch.cat(values, dim=1), labels, grouping, parents)
            else:  # Z·shares, parent by parent: never all K·n neuron values at once, in their precision
                target = sum(value @ share for value, share in zip(values, shares)).double()
            assert isinstance(target, Tensor)
            if terms:
                target = target - rows_of(torch.stack(terms).sum(0), level.axis).double()
            features, offset = rows(fused_input)
            if offset is not None:  # in the rows the features lay out
                target = (target - offset).reshape(features.shape[0], -1)
            stats.add(features, target)
    context.keep(collected, level.target)


def _fit_per_channel(
    level: Level, grouping: SpaceGrouping, method: str, seconds: dict[str, float], context: FusionContext
) -> LevelReport:
    """Fit a module's per-channel parameters (a norm's scale and shift, a PReLU's slopes) in closed form,
    channel by channel (`fedfuse.fusion.per_channel`), pulled toward the members' mix."""
    module = context.fused.get_submodule(context.fused_level(level).modules[0])
    standardise(module, lambda: context.run_fused(level.output))
    one = shared(module)
    parameters = sum(1 for _ in module.parameters())
    width = context.fused_level(level).width
    stats = ChannelStatistics(1 if one else width, parameters, context.device)

    def rows(inputs: Tensor) -> tuple[Tensor, Tensor]:
        offset, features = parameter_features(module, inputs, level.axis)
        if one:  # one problem over every channel: a row per sample, position and channel
            return features.reshape(-1, 1, parameters), offset
        return features, offset

    clock = time.perf_counter()
    _statistics(level, stats, rows, context, grouping, None)
    seconds["statistics"] = seconds.get("statistics", 0.0) + time.perf_counter() - clock

    clock = time.perf_counter()
    parents = [parent.get_submodule(level.modules[0]) for parent in context.parents]
    prior = None
    if context.config.prior != "zero":
        prior = aligned(parents, grouping.shares, module).to(context.device)
    fit = solve_channels(stats, context.config.ridge, with_bias=False, prior=prior)
    write_parameters(module, fit.weight)
    seconds["solve"] = time.perf_counter() - clock
    parent_norm = stats_.mean(
        float(torch.cat([p.detach().double().flatten() for p in parent.parameters()]).norm())
        for parent in parents
    )
    return _report(level, width, parameters, stats.rows, method, grouping, seconds, fit, parent_norm)
