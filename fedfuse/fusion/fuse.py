"""`fuse`: neuron-interpolation fusion of K models into one, level by level."""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fedfuse.fusion.calibration import CalibrationSet
from fedfuse.fusion.config import FusionConfig
from fedfuse.fusion.fitting import fit_level, write_level
from fedfuse.fusion.grouping import group_neurons, grouping_cost, shares_by_index
from fedfuse.fusion.importance import importance_scores
from fedfuse.fusion.levels import Leaves, Level, find_levels, leaves_of
from fedfuse.fusion.parents import ParentWeights, check_parents, resolve_weights
from fedfuse.fusion.report import FusionReport, LevelReport
from fedfuse.fusion.statistics import LevelStatistics, layer_inputs, neuron_values


@dataclass(frozen=True)
class FusionResult:
    """What `fuse` returns.

    Attributes:
        model: the fused model: a new module with parent 0's architecture and state_dict keys, in parent
            0's train/eval mode.
        report: per-level grouping cost, fit quality and seconds, and totals.
    """

    model: nn.Module
    report: FusionReport


def fuse(
    models: Sequence[nn.Module],
    calibration: Tensor | tuple | Iterable,
    config: FusionConfig | None = None,
    weights: object = None,
) -> FusionResult:
    """Fuse K models of one architecture into one, by neuron interpolation on a calibration set.

    Level by level (a Linear or Conv2d layer with its BatchNorm), every parent's neurons are scored for
    importance and grouped into as many groups as the level has neurons; each fused neuron is then fitted
    by least squares to reproduce its group's importance-weighted mean activation, taking as input the
    fused model's *own* previous levels, so errors made earlier are corrected later. The output layer
    matches classes by index.

    Args:
        models: K >= 1 models with the same architecture (``nn.Sequential``, nested ones too, of
            Linear, Conv2d, BatchNorm and parameter-free modules). They are never modified; K = 1
            returns a copy.
        calibration: server-side inputs: a tensor ``[N, ...]``, an ``(inputs, labels)`` pair, or a
            re-iterable of such batches (a DataLoader). Labels (class indices) are the attribution
            targets; without them each parent's own prediction is.
        config: how to fuse; `FusionConfig()` by default.
        weights: ``None``, per-parent weights ``[K]`` (e.g. the clients' example counts), or
            per-parent, per-class weights ``[K, C]`` (e.g. the clients' label counts), which weight the
            output layer's classes and, by their row sums, the parents.

    Returns:
        A `FusionResult` with the fused ``model`` and its ``report``.

    Raises:
        ValueError: parents that differ in architecture, keys, shapes or dtypes (naming the parent and
            the parameter), non-finite parents, an empty calibration set, bad weights, or
            ``grouping="hungarian"`` with K != 2.
        TypeError: parents that are not ``nn.Sequential`` models, or calibration data of no known form.
    """
    started = time.perf_counter()
    config = config if config is not None else FusionConfig()
    if not isinstance(config, FusionConfig):
        raise TypeError(f"config must be a FusionConfig, got {type(config).__name__}")
    models = list(models)
    check_parents(models)
    _, levels = find_levels(models[0])
    calibration_set = CalibrationSet(calibration, config.batch_size)
    parent_weights = resolve_weights(weights, len(models), levels[-1].width)
    fused = copy.deepcopy(models[0])
    if len(models) == 1:
        return FusionResult(fused, _report(config, 1, calibration_set, [], started))
    if config.grouping == "hungarian" and len(models) != 2:
        raise ValueError(f"grouping='hungarian' matches exactly 2 parents; got {len(models)}. Use 'kmeans'")

    training = models[0].training
    parameter = next(models[0].parameters())
    device, dtype = parameter.device, parameter.dtype
    parents = [copy.deepcopy(model).to(device).eval() for model in models]  # captum hooks land on copies
    fused.eval()
    fusion = _LevelFusion(parents, fused, calibration_set, config, parent_weights, device, dtype)
    reports = [
        fusion.fuse_level(level, is_output=(index == len(levels) - 1))
        for index, level in enumerate(tqdm(levels, desc="fusing levels", disable=not config.progress))
    ]
    fused.train(training)
    return FusionResult(fused, _report(config, len(models), calibration_set, reports, started))


class _LevelFusion:
    """The per-level work of one `fuse` call, sharing its parents, fused model and calibration set."""

    def __init__(
        self,
        parents: list[nn.Module],
        fused: nn.Module,
        calibration: CalibrationSet,
        config: FusionConfig,
        weights: ParentWeights,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.parents = parents
        self.parent_leaves = [leaves_of(parent) for parent in parents]
        self.fused_leaves: Leaves = leaves_of(fused)
        self.calibration = calibration
        self.config = config
        self.weights = weights
        self.device, self.dtype = device, dtype

    def fuse_level(self, level: Level, is_output: bool) -> LevelReport:
        seconds: dict[str, float] = {}
        clock = time.perf_counter()
        layer = self.fused_leaves.module(level.name)
        stats = self._statistics(level, layer)
        seconds["statistics"] = time.perf_counter() - clock

        clock = time.perf_counter()
        scores = self._scores(level, is_output)
        seconds["importance"] = time.perf_counter() - clock

        clock = time.perf_counter()
        gram, sums = stats.ztz.cpu(), stats.z_sum.cpu()
        if is_output:
            shares = shares_by_index(self.weights.classes)
            cost = grouping_cost(gram, sums, stats.rows, scores, shares)
        else:
            grouping = group_neurons(
                self.config.grouping, gram, sums, stats.rows, scores, level.width, level.width,
                seed=self.config.seed, n_init=self.config.kmeans_n_init, max_iter=self.config.kmeans_max_iter,
            )  # fmt: skip
            shares, cost = grouping.shares, grouping.cost
        seconds["grouping"] = time.perf_counter() - clock

        clock = time.perf_counter()
        norm = self.fused_leaves.module(level.norm) if level.norm else None
        with_bias = layer.bias is not None or norm is not None
        fan_in = stats.xtx.shape[0] + int(with_bias)
        ill_posed = stats.rows < fan_in
        if ill_posed:
            warnings.warn(
                f"level '{level.name}': {stats.rows} calibration rows for a fan-in of {fan_in}; the fit is "
                f"underdetermined and the ridge ({self.config.ridge}) keeps it well-posed. A larger "
                "calibration set fits better.",
                stacklevel=4,  # the caller of fuse()
            )
        fit = fit_level(stats, shares.to(self.device), self.config.ridge, with_bias)
        write_level(layer, norm, fit)
        seconds["solve"] = time.perf_counter() - clock
        return LevelReport(
            name=level.name, kind=level.kind, neurons=level.width, fan_in=fan_in, rows=stats.rows,
            grouping="index" if is_output else self.config.grouping, grouping_cost=cost, fit_r2=fit.r2,
            seconds=seconds, ill_posed=ill_posed,
        )  # fmt: skip

    def _statistics(self, level: Level, layer: nn.Module) -> LevelStatistics:
        """One pass: the fused model's inputs to the level against every parent's neuron values."""
        stats: LevelStatistics | None = None
        with torch.no_grad():
            for inputs, _ in self.calibration.batches(self.device, self.dtype):
                x = layer_inputs(layer, self.fused_leaves.run(inputs, 0, level.start))
                z = torch.cat(
                    [
                        neuron_values(level, leaves.run(inputs, 0, level.stop))
                        for leaves in self.parent_leaves
                    ],
                    dim=1,
                )
                if stats is None:
                    stats = LevelStatistics(x.shape[1], z.shape[1], self.device)
                stats.add(x, z)
        assert stats is not None  # CalibrationSet guarantees a non-empty set
        return stats

    def _scores(self, level: Level, is_output: bool) -> Tensor:
        """``[K·n]`` importance of every parent neuron, times its parent's weight. The output layer is
        grouped by index and weighted per class instead."""
        if is_output:
            return self.weights.classes.flatten()
        scores = [
            importance_scores(
                self.config.importance, parent, level, leaves.module(level.norm or level.name),
                self.calibration, self.dtype, self.config.conductance_steps,
            ) * weight
            for parent, leaves, weight in zip(self.parents, self.parent_leaves, self.weights.parents)
        ]  # fmt: skip
        return torch.cat(scores)


def _report(
    config: FusionConfig, parents: int, calibration: CalibrationSet, levels: list[LevelReport], started: float
) -> FusionReport:
    return FusionReport(
        parents=parents,
        calibration_samples=calibration.num_samples,
        config=config.to_dict(),
        levels=tuple(levels),
        seconds=time.perf_counter() - started,
    )
