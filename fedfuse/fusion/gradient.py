"""The gradient variant: each level is trained, by a few epochs of gradient descent, to reproduce its group
targets from the fused model's own previous levels.

It fits any level: a Linear/Conv layer like the linear variant, and also a block (attention, a LayerNorm, a
class token: whatever the closed form cannot fit). Per level: the space's grouping is decided once (from
the parents' Gram matrices, streamed as in the linear variant); one pass caches the fused model's inputs to
the level and the group targets (minus the fused model's other terms, for a level that completes a
residual sum), ``[N, ...]`` each (so, unlike the linear variant, memory grows with the calibration set: one
level's activations); then the level's parameters are trained on an importance-weighted squared error, with
early stopping on a held-out slice of the calibration samples and the best weights restored.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedfuse.fusion.batchnorm import renormalize_batchnorms
from fedfuse.fusion.config import FusionConfig
from fedfuse.fusion.context import FusionContext
from fedfuse.fusion.fitting import write_level
from fedfuse.fusion.levels import Level
from fedfuse.fusion.lookup import fit_lookup
from fedfuse.fusion.per_channel import aligned, standardise, write_parameters
from fedfuse.fusion.prior import aligned_prior, folded_weights, weight_norm
from fedfuse.fusion.report import LevelReport
from fedfuse.fusion.statistics import layer_map, rows_of
from fedfuse.fusion.targets import (
    SpaceGrouping,
    class_targets,
    group_space,
    measure_points,
    output_target,
)


def fit_gradient(level: Level, context: FusionContext, index: int) -> LevelReport:
    """Train one level of the fused model to its group targets."""
    clock = time.perf_counter()
    space = context.plan.spaces[level.space]
    seconds: dict[str, float] = {}
    grouping = context.groupings.get(space.name)
    method = "stream" if grouping is not None else None
    if grouping is None:
        embeddings = measure_points(space, context, keep_targets=True)
        seconds["statistics"] = time.perf_counter() - clock
        grouping = context.groupings[space.name] = group_space(space, embeddings, context)
        seconds["importance"], seconds["grouping"] = grouping.importance_seconds, grouping.grouping_seconds

    if level.kind == "embedding":
        return fit_lookup(level, grouping, method or grouping.method, seconds, context)
    clock = time.perf_counter()
    fused_level = context.fused_level(level)
    direct = output_target(context) if space.classes and output_target(context) != "logits" else None
    inputs, targets = _cache(level, grouping, context, direct)
    body = context.fused_reader.body(context.fused, fused_level)
    parameters = [context.fused.get_parameter(name) for name in fused_level.parameters]
    owners = _owners(context.fused, fused_level)
    parent_norm = statistics.mean(_norm(parent, level) for parent in context.parents)
    if context.config.level_init == "fresh":
        _reinitialise(owners, seed=context.config.seed + index)
    elif level.kind == "per_channel" and context.config.prior != "zero":  # the members' mix
        members = [parent.get_submodule(level.modules[0]) for parent in context.parents]
        standardise(owners[0], lambda: context.run_fused(level.output))
        write_parameters(owners[0], aligned(members, grouping.shares, owners[0]))
    elif level.layer is not None:
        _start_from_prior(level, fused_level, grouping, inputs, context)
    weights = grouping.group_weights / grouping.group_weights.mean()
    config = context.config
    epochs = _train(body, parameters, inputs, targets, weights, level.axis, config, index)
    norms = [module for module in owners if isinstance(module, _BatchNorm)]
    renormalize_batchnorms(norms, lambda: _apply_in_batches(body, inputs, config.batch_size))
    seconds["fit"] = time.perf_counter() - clock
    return LevelReport(
        name=level.name,
        kind=level.kind,
        neurons=fused_level.width,
        fan_in=_fan_in(context.fused, fused_level, inputs),
        rows=targets.numel() // fused_level.width,
        grouping=method or grouping.method,
        grouping_cost=grouping.costs[level.target],
        fit_r2=_r2(body, inputs, targets, level.axis, config.batch_size),
        seconds=seconds,
        space=level.space,
        epochs=epochs,
        weight_norm=_norm(context.fused, fused_level),
        parent_weight_norm=parent_norm,
    )


def _cache(
    level: Level, grouping: SpaceGrouping, context: FusionContext, direct: str | None
) -> tuple[Tensor, Tensor]:
    """The fused model's inputs to the level and its targets (group targets, or the classes' own target
    when ``direct`` names one, `class_targets`; minus the fused residual terms), for every calibration
    sample. The parents' values at a stream's sums come from its grouping pass where it kept them
    (`FusionContext.stream_targets`), so the parents do not run again for each level of a stream."""
    shares = grouping.shares.to(context.device, context.dtype)
    inputs, targets = [], []
    places = [level.input, *level.residual]
    kept = context.stream_targets.get(level.target)
    with torch.no_grad():
        for index, (batch, labels) in enumerate(context.calibration.batches(context.device, context.dtype)):
            at = (index, slice(None))
            fused_input, *terms = context.fused_reader.read(context.fused, batch, places, at)
            inputs.append(fused_input.detach())
            outputs = [
                kept[id(parent)][index]
                if kept is not None
                else context.parent_reader.read(parent, batch, [level.target], at)[0]
                for parent in context.parents
            ]
            stacked = torch.cat([out.movedim(level.axis, -1) for out in outputs], dim=-1)
            rows = stacked.reshape(-1, stacked.shape[-1])
            if direct is not None:
                own = class_targets(direct, rows, labels, grouping, len(outputs))
                assert own is not None
                target = own.to(context.dtype).reshape(*stacked.shape[:-1], -1).movedim(-1, level.axis)
            else:
                target = (stacked @ shares).movedim(-1, level.axis)
            targets.append(target - torch.stack(terms).sum(0) if terms else target)
    return torch.cat(inputs), torch.cat(targets)


def _start_from_prior(
    level: Level, fused_level: Level, grouping: SpaceGrouping, inputs: Tensor, context: FusionContext
) -> None:
    """Start a layer from the parents' aligned average (`fedfuse.fusion.prior`), its BatchNorm set to
    pass the layer's output on the cached inputs through unchanged."""
    assert level.layer is not None and fused_level.layer is not None
    layer = context.fused.get_submodule(fused_level.layer)
    norm = context.fused.get_submodule(fused_level.norm) if fused_level.norm else None
    with_bias = layer.bias is not None or norm is not None
    parent_maps = [folded_weights(parent, level.layer, level.norm) for parent in context.parents]
    prior = aligned_prior(level, grouping, parent_maps, context, with_bias)
    if prior is None:
        return
    fan_in = prior.shape[0] - int(with_bias)
    weight = prior[:fan_in]
    bias = prior[fan_in] if with_bias else torch.zeros(prior.shape[1], dtype=torch.float64)
    with torch.no_grad():
        rows = [layer_map(layer, level.channelwise, batch, weight) for batch in inputs.split(1024)]
        outputs = torch.cat(rows) + bias
    write_level(layer, norm, weight, bias, outputs.mean(0), outputs.var(0, unbiased=False))


def _norm(model: nn.Module, level: Level) -> float:
    """The Frobenius norm of a level's weights: a layer's folded map (bias left out), a block's parameters."""
    if level.layer is not None:
        layer = model.get_submodule(level.layer)
        with_bias = layer.bias is not None or level.norm is not None
        return weight_norm(folded_weights(model, level.layer, level.norm), with_bias)
    values = [model.get_parameter(name).detach().double().flatten() for name in level.parameters]
    return float(torch.cat(values).norm()) if values else 0.0


def _fan_in(model: nn.Module, level: Level, inputs: Tensor) -> int:
    """A layer's inputs per neuron (bias included); a block's input values per sample."""
    if level.layer is None:
        return inputs[0].numel()
    layer = model.get_submodule(level.layer)
    return layer.weight[0].numel() + int(layer.bias is not None or level.norm is not None)


def _owners(model: nn.Module, level: Level) -> list[nn.Module]:
    """The modules that own the level's parameters directly."""
    return [model.get_submodule(name) for name in level.modules]


def _apply_in_batches(body: nn.Module, inputs: Tensor, batch_size: int) -> Tensor:
    return torch.cat([body(batch) for batch in inputs.split(batch_size)])


def _loss(body: nn.Module, inputs: Tensor, targets: Tensor, weights: Tensor, axis: int) -> Tensor:
    """Importance-weighted mean squared error: group k's error counts S_k / mean(S)."""
    error = rows_of(body(inputs) - targets, axis)
    return (error.square() * weights).mean()


def _train(
    body: nn.Module,
    parameters: list[nn.Parameter],
    inputs: Tensor,
    targets: Tensor,
    weights: Tensor,
    axis: int,
    config: FusionConfig,
    index: int,
) -> int:
    """Fit the level's parameters; early stopping on held-out samples restores the best weights.

    Returns the number of epochs run. The model stays in eval mode: BatchNorm acts with its running
    statistics (an affine map with trainable scale and shift), Dropout is off.
    """
    if not parameters:
        return 0
    weights = weights.to(inputs.device, inputs.dtype)
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
    order = torch.randperm(len(inputs), generator=generator)
    held_out = int(round(len(inputs) * config.validation_fraction))
    validation, training = (
        (order[:held_out], order[held_out:]) if 0 < held_out < len(inputs) else (order, order)
    )
    optimizer = (
        torch.optim.Adam(parameters, lr=config.learning_rate)
        if config.optimizer == "adam"
        else torch.optim.SGD(parameters, lr=config.learning_rate, momentum=0.9)
    )

    def held_out_loss() -> float:
        with torch.no_grad():
            total = sum(
                _loss(body, inputs[batch], targets[batch], weights, axis).item() * len(batch)
                for batch in validation.split(config.batch_size)
            )
        return total / len(validation)

    def snapshot() -> list[Tensor]:
        return [parameter.detach().clone() for parameter in parameters]

    best, best_state, stale, epochs_run = held_out_loss(), snapshot(), 0, 0
    with torch.enable_grad(), _trainable(parameters):
        for epoch in range(1, config.epochs + 1):
            epochs_run = epoch
            for batch in training[torch.randperm(len(training), generator=generator)].split(
                config.fit_batch_size
            ):
                optimizer.zero_grad()
                _loss(body, inputs[batch], targets[batch], weights, axis).backward()
                optimizer.step()
            current = held_out_loss()
            if current < best:
                best, best_state, stale = current, snapshot(), 0
            else:
                stale += 1
                if stale >= config.patience:
                    break
    with torch.no_grad():
        for parameter, value in zip(parameters, best_state):
            parameter.copy_(value)
    return epochs_run


@contextmanager
def _trainable(parameters: list[nn.Parameter]) -> Iterator[None]:
    """The parameters with gradients on while they are fitted, and their own flags after: every level is
    fused, a layer the clients froze (``requires_grad=False``, a shared feature extractor) included, and
    the fused model keeps it frozen."""
    flags = [parameter.requires_grad for parameter in parameters]
    try:
        for parameter in parameters:
            parameter.requires_grad_(True)
        yield
    finally:
        for parameter, flag in zip(parameters, flags):
            parameter.requires_grad_(flag)


def _r2(body: nn.Module, inputs: Tensor, targets: Tensor, axis: int, batch_size: int) -> float:
    """Pooled R² of the fitted level's outputs against the targets, over every cached row."""
    with torch.no_grad():
        outputs = rows_of(_apply_in_batches(body, inputs, batch_size), axis).double()
    expected = rows_of(targets, axis).double()
    residual = (outputs - expected).square().sum()
    spread = (expected - expected.mean(0)).square().sum()
    return float(1 - residual / spread) if spread > 0 else float(residual == 0)


def _reinitialise(owners: list[nn.Module], seed: int) -> None:
    """A seeded fresh init of every owner module that knows how to reset itself and holds no submodule
    with parameters (so a reset never reaches another level's parameters)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in owners:
            reset = getattr(module, "reset_parameters", None)
            nested = any(True for child in module.children() for _ in child.parameters())
            if callable(reset) and not nested:
                reset()
