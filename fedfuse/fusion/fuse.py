"""`fuse`: neuron-interpolation fusion of K models into one, level by level."""

from __future__ import annotations

import copy
import math
import statistics
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fedfuse.fusion.calibration import CalibrationSet
from fedfuse.fusion.config import FusionConfig
from fedfuse.fusion.context import FusionContext
from fedfuse.fusion.declared import LevelSpec
from fedfuse.fusion.gradient import fit_gradient
from fedfuse.fusion.levels import Level, LevelPlan, plan_levels
from fedfuse.fusion.linear import fit_linear
from fedfuse.fusion.parametrized import (
    check_parametrizations,
    copied,
    has_parametrizations,
    with_parametrizations,
    without_parametrizations,
)
from fedfuse.fusion.parent_scores import ParentScores, score_parents
from fedfuse.fusion.parents import check_parents
from fedfuse.fusion.polish import polish
from fedfuse.fusion.reading import CHECKPOINT_VALUES, Reader
from fedfuse.fusion.report import FusionReport, LevelReport
from fedfuse.fusion.rescaling import rescale_toward_parents
from fedfuse.fusion.sharpness import SAMPLES as SHARPNESS_SAMPLES
from fedfuse.fusion.sharpness import sharpness
from fedfuse.fusion.weights import ParentWeights, calibrated_weights, given_weights, uniform_weights
from fedfuse.fusion.width import resize_spaces

#: With ``sharpness_limit="parents"``: the ridge is raised by this factor until the fused model is no
#: sharper than its parents' median, up to `MAX_RIDGE` (where the fits are mostly the aligned prior).
RIDGE_STEP = math.sqrt(10)
MAX_RIDGE = 1.0


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
    calibration: Tensor | tuple | Iterable | CalibrationSet,
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
        models: K >= 1 models of one architecture, any ``nn.Module`` whose forward takes one tensor and
            returns its logits: levels are found by tracing it (`fedfuse.fusion.levels`; see them with
            `describe_levels`), or taken from a declaration (``levels``, or a method ``fusion_levels()``).
            They are never modified; K = 1 returns a copy (or, with a width multiplier below 1, a
            narrower model fitted to the one).
        calibration: server-side inputs: a tensor ``[N, ...]``, an ``(inputs, labels)`` pair, or a
            re-iterable of such batches (a DataLoader, read once), or a `CalibrationSet` already read.
            Labels (class indices) are the attribution targets; without them each parent's own
            prediction is.
        config: how to fuse; `FusionConfig()` by default (the auto variant: the closed form for every level
            it fits, gradient descent for blocks).
        weights: ``None``, per-parent weights ``[K]`` (e.g. the clients' example counts), or
            per-parent, per-class weights ``[K, C]`` (e.g. the clients' label counts), which weight the
            output layer's classes and, by their row sums, the parents.
        levels: the levels of ``models[0]``'s architecture, as module names or `LevelSpec`\ s, to use
            instead of tracing it (`fedfuse.fusion.declared`).

    Returns:
        A `FusionResult` with the fused ``model`` and its ``report``.

    Raises:
        ValueError: parents that differ in architecture, keys, shapes or dtypes (naming the parent and
            the parameter), non-finite or meta-device parents, tied parameters or a module with
            parameters called twice, calibration data that is empty, not finite, does not fit the models
            or has labels out of range, bad weights, a level declaration that does not fit the model, a
            level the variant cannot fit, or ``grouping="hungarian"`` with K != 2.
        TypeError: calibration data of no known form; `UntraceableModelError` (a TypeError): a model
            that cannot be traced and declares no levels.
    """
    started = time.perf_counter()
    config = config if config is not None else FusionConfig()
    if not isinstance(config, FusionConfig):
        raise TypeError(f"config must be a FusionConfig, got {type(config).__name__}")
    models = list(models)
    check_parents(models)
    check_parametrizations(models[0], config.width_multiplier)
    parameter = next(models[0].parameters(), None)
    if parameter is None:
        raise ValueError("the models have no parameters to fuse")
    device, dtype = parameter.device, parameter.dtype
    calibration_set = CalibrationSet(calibration, config.batch_size)
    # Hooks land on copies, each parametrized layer made the plain layer it computes (`_finish` restores it).
    parents = [without_parametrizations(copied(model).to(device).eval()) for model in models]
    plan, example = _plan(parents[0], calibration_set, config, levels)
    calibration_set = labelled_as_classes(calibration_set, plan)
    if _forward_only(config, plan) and _runs_channels_last(parents[0], example):
        parents = [parent.to(memory_format=torch.channels_last) for parent in parents]
    _check_width(config, len(models), plan)
    # Measured on the calibration set: the parents' order (by what they compute, never by arrival) and,
    # unless the caller gives weights, how much each parent counts per class.
    scores = score_parents(parents, calibration_set, plan.output_width, device, dtype)
    order = scores.order(parents)
    parents, scores = [parents[k] for k in order], scores.reordered(order)
    parent_weights = _weights(weights, order, scores, config, calibration_set.has_labels)
    if (
        config.grouping == "hungarian"
        and len(models) != 2
        and (len(models) > 1 or config.width_multiplier != 1)
    ):
        raise ValueError(f"grouping='hungarian' matches exactly 2 parents; got {len(models)}. Use 'kmeans'")

    if len(models) == 1 and config.width_multiplier == 1:
        return FusionResult(
            _finish(copy.deepcopy(parents[0]), models[0]), _report(config, 1, calibration_set, [], started)
        )

    limit = None
    if config.sharpness_limit == "parents" and calibration_set.has_labels:
        inputs, labels = calibration_set.head(SHARPNESS_SAMPLES, device, dtype)
        limit = statistics.median(sharpness(parent, inputs, labels, config.seed) for parent in parents)
    attempt = config
    while True:
        fused, reports = _fuse_levels(parents, calibration_set, attempt, parent_weights, plan, example)
        if config.rescale == "parents":
            reports = rescale_toward_parents(fused, plan, reports, example)
        measured = None if limit is None else sharpness(fused, inputs, labels, config.seed)
        if measured is None or measured <= limit or attempt.ridge >= MAX_RIDGE:
            break
        attempt = replace(attempt, ridge=min(MAX_RIDGE, attempt.ridge * RIDGE_STEP))
    if config.polish_epochs and calibration_set.has_labels:
        polish(
            fused,
            parents,
            calibration_set,
            parent_weights.classes,
            config.polish_epochs,
            config.seed,
            device,
            dtype,
        )
    report = _report(attempt, len(models), calibration_set, reports, started, measured, limit)
    return FusionResult(_finish(fused, models[0]), report)


def _fuse_levels(
    parents: list[nn.Module],
    calibration: CalibrationSet,
    config: FusionConfig,
    weights: ParentWeights,
    plan: LevelPlan,
    example: Tensor,
) -> tuple[nn.Module, list[LevelReport]]:
    """One fusion of the (ordered) parents: a fresh copy of the reference parent, resized if asked, every
    level fitted in turn, the rest averaged."""
    fused = copy.deepcopy(parents[0])  # every parameter is fitted; the structure is everyone's
    fused_plan = plan
    if config.width_multiplier != 1:
        fused_plan = resize_spaces(fused, plan, config.width_multiplier, config.seed, example)
    parameter = next(fused.parameters())
    budget = [CHECKPOINT_VALUES]  # the checkpoints of the parents and the fused model share one budget
    parent_reader = Reader(plan, budget)
    context = FusionContext(
        parents=parents,
        fused=fused,
        calibration=calibration,
        config=config,
        weights=weights,
        plan=plan,
        fused_plan=fused_plan,
        parent_reader=parent_reader,
        fused_reader=parent_reader if fused_plan is plan else Reader(fused_plan, budget),
        device=parameter.device,
        dtype=parameter.dtype,
    )
    reports = []
    for index, level in enumerate(tqdm(plan.levels, desc="fusing levels", disable=not config.progress)):
        context.advance(level)
        reports.append(fuse_level(index, level, context))
    _average_the_rest(fused, parents, plan)
    return fused, reports


def check_fusable(
    model: nn.Module,
    calibration: Tensor | tuple | Iterable,
    config: FusionConfig | None = None,
    levels: Sequence[LevelSpec | str] | None = None,
) -> LevelPlan:
    """Check, without fusing anything, that models like ``model`` can be fused with ``config`` on
    ``calibration``, and return their `LevelPlan`: what `fuse` checks before any work, for one model.

    Raises:
        ValueError, TypeError: as `fuse` would, naming the problem.
    """
    config = config if config is not None else FusionConfig()
    check_parents([model])
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise ValueError("the model has no parameters to fuse")
    calibration_set = CalibrationSet(calibration, config.batch_size)
    plan = _plan(without_parametrizations(copied(model).eval()), calibration_set, config, levels)[0]
    labelled_as_classes(calibration_set, plan, warn=False)  # setting labels aside is no refusal
    return plan


def labelled_as_classes(calibration: CalibrationSet, plan: LevelPlan, warn: bool = True) -> CalibrationSet:
    """The calibration set whose labels, if any, index the models' classes.

    A model with one output (a value to regress, or one score for two classes, be it a logit or a
    probability) has no classes for labels to index, and fusion cannot tell which score a label means:
    its labels are set aside, with a warning, and fusion uses the inputs alone (parents weighted
    equally unless weights are given, each attributed on its own output). ``warn=False`` sets them aside
    silently (`check_fusable`, which refuses only what cannot be fused).

    Raises:
        ValueError: labels outside the classes of a model with several outputs.
    """
    if plan.output_width == 1 and calibration.has_labels:
        if warn:
            warnings.warn(
                f"{plan.model} has one output, which no class label indexes: its calibration labels are not "
                "used (no per-class weights; parents weighted equally unless weights are given)",
                stacklevel=3,
            )
        return calibration.without_labels()
    calibration.check_labels(plan.output_width)
    return calibration


def fuse_level(index: int, level: Level, context: FusionContext) -> LevelReport:
    """Fuse one level: its space's grouping (decided by the first of the space's levels), then the fit of
    its parameters to the group targets, by the configured variant (``"auto"``: in closed form where the
    linear variant can, by gradient descent for a block), with the fused model's own previous levels as
    input."""
    if context.config.variant == "linear" or (context.config.variant == "auto" and level.closed_form):
        report = fit_linear(level, context)
    else:
        report = fit_gradient(level, context, index)
    space = context.plan.spaces[level.space]
    if space.levels[-1] == level.name:  # the stream's targets its grouping pass kept are used up
        context.forget_targets(space)
    return report


def _plan(
    model: nn.Module,
    calibration: CalibrationSet,
    config: FusionConfig,
    levels: Sequence[LevelSpec | str] | None,
) -> tuple[LevelPlan, Tensor]:
    """The levels of an eval-mode ``model``, checked against the calibration set and the config."""
    parameter = next(model.parameters())
    example = calibration.example(parameter.device, parameter.dtype)
    _check_runs(model, example)
    if config.importance == "conductance" and not example.is_floating_point():
        raise ValueError(
            f"importance='conductance' integrates along a path from a baseline to each input, which "
            f"{example.dtype} inputs (token ids) do not have; use 'gradient_x_activation', 'deeplift' or "
            "'uniform'"
        )
    plan = plan_levels(model, example, levels)
    plan.check(config.variant, config.width_multiplier)
    if config.grouping != "index":
        for space in plan.spaces.values():
            if space.why_fixed and space.width > 1:  # one neuron is matched by index as it is grouped
                warnings.warn(
                    f"level '{space.name}': its neurons are matched by index, not grouped "
                    f"({space.why_fixed}); parents trained from different starts fuse poorly there. Write "
                    "the operation with one fusion has a rule for (docs/fusion.md), or declare the levels",
                    stacklevel=3,
                )
    return plan, example


def _check_runs(model: nn.Module, example: Tensor) -> None:
    """The models must accept the calibration inputs and return one tensor."""
    try:
        with torch.no_grad():
            output = model(example)
    except Exception as error:
        raise ValueError(
            "the models cannot run on the calibration inputs "
            f"(shape {list(example.shape)}, {example.dtype}): {type(error).__name__}: {error}"
        ) from error
    if not isinstance(output, Tensor):
        raise ValueError(f"the models return {type(output).__name__}; fusion needs one tensor of logits")


def _check_width(config: FusionConfig, parents: int, plan: LevelPlan) -> None:
    if config.width_multiplier > parents:
        raise ValueError(
            f"width_multiplier {config.width_multiplier:g} asks for more groups than the {parents} "
            f"parent{'s' if parents != 1 else ''} have neurons; at most {parents} "
            "(every parent neuron kept apart)"
        )


def _weights(
    weights: object, order: list[int], scores: ParentScores, config: FusionConfig, labelled: bool
) -> ParentWeights:
    """The caller's weights (rows put in the parents' order), else the calibration estimate, else uniform."""
    parents, classes = scores.true_class_probability.shape
    if weights is not None:
        resolved = given_weights(weights, parents, classes)
        index = torch.as_tensor(order)
        return ParentWeights(resolved.parents[index], resolved.classes[index], resolved.source)
    if config.class_weights == "calibration" and labelled:
        return calibrated_weights(scores, config.class_weight_sharpness)
    return uniform_weights(parents, classes)


def _average_the_rest(fused: nn.Module, parents: list[nn.Module], plan: LevelPlan) -> None:
    """What no level fits takes the parents' mean, never one parent's values: parameters the forward never
    uses (they cannot change the function), and buffers no fit sets (a BatchNorm's batch counter takes the
    parents' median count: their largest would let one parent set it, to 2**62 say)."""
    fitted = {
        f"{module}.{name}"
        for level in plan.levels
        for module in (level.norm, *level.modules)
        if module
        for name in ("running_mean", "running_var")
    }
    with torch.no_grad():
        for name in plan.unused:
            values = torch.stack([parent.get_parameter(name) for parent in parents])
            fused.get_parameter(name).copy_(values.mean(0))
        for name, buffer in fused.named_buffers():
            if name in fitted:
                continue
            values = torch.stack([parent.get_buffer(name) for parent in parents])
            mean = values.double().mean(0).to(buffer.dtype)
            buffer.copy_(mean if buffer.is_floating_point() else values.median(0).values)


def _forward_only(config: FusionConfig, plan: LevelPlan) -> bool:
    """Whether a fusion with ``config`` runs no backward pass: the linear variant (or the auto variant on
    a model without blocks) with uniform importance, no sharpness limit and no polish. Only such fusions
    use channels-last convolutions (`_runs_channels_last`): in torch 2.13 on the CPU, a channels-last
    convolution's weight gradient run in a thread other than the main one can corrupt the heap (oneDNN;
    seen as an abort in ``mkldnn_convolution_backward_weights`` when the strategy fused with the
    gradient variant)."""
    closed_form = all(level.closed_form for level in plan.levels)
    return (
        (config.variant == "linear" or (config.variant == "auto" and closed_form))
        and config.importance == "uniform"
        and config.sharpness_limit == "none"
        and not config.polish_epochs
    )


def _runs_channels_last(model: nn.Module, example: Tensor) -> bool:
    """Whether ``model`` has 2-D convolution weights and still runs with them in channels-last memory
    format (a ``view`` of their outputs, as in Flower's quickstart ``Net``, does not). Fusing in that
    format makes the convolutions' outputs channels-last too: a level's neuron values are then rows of
    neurons (`rows_of`) without a copy, and on the CPU the convolutions run about a third faster
    (ResNet-8 on MNIST batches). The format changes no value."""
    if not any(parameter.dim() == 4 for parameter in model.parameters()):
        return False
    model.to(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            model(example)
    except Exception:  # noqa: BLE001 - any failure means: fuse in the model's own format
        return False
    finally:
        model.to(memory_format=torch.contiguous_format)
    return True


def _finish(fused: nn.Module, model: nn.Module) -> nn.Module:
    """The fused model where parent 0 was, in its train/eval mode and the usual memory format, its
    parametrized layers as parent 0's."""
    if has_parametrizations(model):
        fused = with_parametrizations(fused, model)
    parameter = next(model.parameters())
    return fused.to(parameter.device, memory_format=torch.contiguous_format).train(model.training)


def _report(
    config: FusionConfig,
    parents: int,
    calibration: CalibrationSet,
    levels: list[LevelReport],
    started: float,
    sharpness: float | None = None,
    limit: float | None = None,
) -> FusionReport:
    return FusionReport(
        parents=parents,
        calibration_samples=calibration.num_samples,
        config=config.to_dict(),
        levels=tuple(levels),
        seconds=time.perf_counter() - started,
        sharpness=sharpness,
        parent_sharpness=limit,
    )
