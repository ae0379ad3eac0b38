"""`fuse`: neuron-interpolation fusion of K models into one, level by level."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fedfuse.fusion.calibration import CalibrationSet
from fedfuse.fusion.config import FusionConfig
from fedfuse.fusion.context import FusionContext
from fedfuse.fusion.declared import LevelSpec
from fedfuse.fusion.gradient import GradientFusion
from fedfuse.fusion.levels import find_levels
from fedfuse.fusion.linear import LinearFusion
from fedfuse.fusion.parents import check_parents, resolve_weights
from fedfuse.fusion.report import FusionReport, LevelReport
from fedfuse.fusion.segments import Segment, capture, channel_dim, segments_of
from fedfuse.fusion.width import resize_hidden_levels


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
    levels: Sequence[LevelSpec | str] | None = None,
) -> FusionResult:
    r"""Fuse K models of one architecture into one, by neuron interpolation on a calibration set.

    Level by level, every parent's neurons are scored for importance and grouped into as many groups as
    the level has neurons; each fused neuron is then fitted to reproduce its group's importance-weighted
    mean activation, taking as input the fused model's *own* previous levels, so errors made earlier are
    corrected later. The output layer matches classes by index.

    Args:
        models: K >= 1 models with the same architecture: ``nn.Sequential`` models (nested ones too) of
            Linear, Conv2d, BatchNorm and parameter-free modules, whose levels are found automatically;
            or, for the gradient variant, any model whose levels are declared (``levels``, or a method
            ``fusion_levels()``; see `fedfuse.fusion.declared`). They are never modified; K = 1 returns
            a copy.
        calibration: server-side inputs: a tensor ``[N, ...]``, an ``(inputs, labels)`` pair, or a
            re-iterable of such batches (a DataLoader). Labels (class indices) are the attribution
            targets; without them each parent's own prediction is.
        config: how to fuse; `FusionConfig()` (the linear variant) by default.
        weights: ``None``, per-parent weights ``[K]`` (e.g. the clients' example counts), or
            per-parent, per-class weights ``[K, C]`` (e.g. the clients' label counts), which weight the
            output layer's classes and, by their row sums, the parents.
        levels: the levels of ``models[0]``'s architecture, as module names or `LevelSpec`\ s, when it
            does not declare them itself (gradient variant).

    Returns:
        A `FusionResult` with the fused ``model`` and its ``report``.

    Raises:
        ValueError: parents that differ in architecture, keys, shapes or dtypes (naming the parent and
            the parameter), non-finite parents, an empty calibration set, bad weights, a level
            declaration that does not fit the model, or ``grouping="hungarian"`` with K != 2.
        TypeError: a model the variant cannot cut into levels, or calibration data of no known form.
    """
    started = time.perf_counter()
    config = config if config is not None else FusionConfig()
    if not isinstance(config, FusionConfig):
        raise TypeError(f"config must be a FusionConfig, got {type(config).__name__}")
    models = list(models)
    check_parents(models)
    calibration_set = CalibrationSet(calibration, config.batch_size)
    declared = levels is not None or hasattr(models[0], "fusion_levels")
    if config.variant == "linear":
        if declared:
            raise ValueError(
                "declared levels are fitted by the gradient variant: use FusionConfig(variant='gradient')"
            )
        _, units = find_levels(models[0])
        outputs = units[-1].width
    else:
        units = segments_of(models[0], levels)
    if config.width_multiplier != 1:
        if config.width_multiplier > len(models) > 1:
            raise ValueError(
                f"width_multiplier {config.width_multiplier:g} asks for more groups than the {len(models)} "
                f"parents have neurons; at most {len(models)} (every parent neuron kept apart)"
            )
        if declared:
            raise ValueError(
                "width_multiplier resizes nn.Sequential chains; declared architectures keep their width"
            )
    parameter = next(models[0].parameters(), None)
    if parameter is None:
        raise ValueError("the models have no parameters to fuse")
    device, dtype = parameter.device, parameter.dtype
    if config.variant == "gradient":
        outputs = _output_width(models[0], units[-1], calibration_set, device, dtype)
    parent_weights = resolve_weights(weights, len(models), outputs)
    fused = copy.deepcopy(models[0])
    widths: list[int | None] = [None] * len(units)
    if config.width_multiplier != 1:
        widths = resize_hidden_levels(fused, config.width_multiplier, config.seed)
    if len(models) == 1:
        return FusionResult(fused, _report(config, 1, calibration_set, [], started))
    if config.grouping == "hungarian" and len(models) != 2:
        raise ValueError(f"grouping='hungarian' matches exactly 2 parents; got {len(models)}. Use 'kmeans'")

    training = models[0].training
    parents = [copy.deepcopy(model).to(device).eval() for model in models]  # captum hooks land on copies
    fused.eval()
    variant = LinearFusion if config.variant == "linear" else GradientFusion
    fusion = variant(FusionContext(parents, fused, calibration_set, config, parent_weights, device, dtype))
    reports = [
        fusion.fuse_level(index, unit, is_output=(index == len(units) - 1), groups=width)
        for index, (unit, width) in enumerate(
            tqdm(list(zip(units, widths)), desc="fusing levels", disable=not config.progress)
        )
    ]
    fused.train(training)
    return FusionResult(fused, _report(config, len(models), calibration_set, reports, started))


def _output_width(model: nn.Module, last: Segment, calibration: CalibrationSet, device, dtype) -> int:
    """The output layer's neurons (the classes), read off one forward pass of the first batch."""
    inputs, _ = next(calibration.batches(device, dtype))
    was_training = model.training
    try:
        with torch.no_grad():
            output = capture(model.eval(), dict(model.named_modules())[last.modules[-1]], inputs, output=True)
    finally:
        model.train(was_training)
    return output.shape[channel_dim(output)]


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
