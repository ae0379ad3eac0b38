"""The gradient variant: each level is trained, by a few epochs of gradient descent, to reproduce its group
targets from the fused model's own previous levels.

It fits any level (a residual block, a transformer block, a classifier head), where the linear variant
needs a single Linear/Conv2d. Per level: one streamed pass accumulates the parents' Gram matrix for
grouping (as in the linear variant); a second pass caches the fused model's inputs to the level and the
group targets, ``[N, ...]`` each (so, unlike the linear variant, memory grows with the calibration set:
one level's activations); then the level's parameters are trained on an importance-weighted squared
error, with early stopping on a held-out slice of the calibration samples and the best weights restored.
Levels that add into a residual stream take the grouping of the level that defines the stream.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import Tensor, nn

from fedfuse.fusion.batchnorm import renormalize_batchnorms
from fedfuse.fusion.config import FusionConfig
from fedfuse.fusion.context import FusionContext
from fedfuse.fusion.level_grouping import LevelGrouping, group_level
from fedfuse.fusion.report import LevelReport
from fedfuse.fusion.segments import Segment, capture, channel_dim, channels_last


class GradientFusion:
    """The per-level work of one gradient-variant `fuse` call."""

    def __init__(self, context: FusionContext) -> None:
        self.context = context
        self.parent_modules = [dict(parent.named_modules()) for parent in context.parents]
        self.fused_modules = dict(context.fused.named_modules())
        self.groupings: dict[str, LevelGrouping] = {}

    def fuse_level(self, index: int, segment: Segment, is_output: bool, groups: int | None) -> LevelReport:
        clock = time.perf_counter()
        gram, sums, rows = self._gram(segment)
        statistics_seconds = time.perf_counter() - clock

        grouping = group_level(
            gram,
            sums,
            rows,
            context=self.context,
            scored_modules=[modules[segment.modules[-1]] for modules in self.parent_modules],
            is_output=is_output,
            groups=groups,
            stream=self.groupings.get(segment.stream) if segment.stream else None,
        )
        self.groupings[segment.name] = grouping

        clock = time.perf_counter()
        inputs, targets = self._cache(segment, grouping.shares)
        modules = [self.fused_modules[name] for name in segment.modules]
        if self.context.config.level_init == "fresh":
            _reinitialise(modules, seed=self.context.config.seed + index)
        weights = grouping.group_weights / grouping.group_weights.mean()
        epochs = _train(modules, inputs, targets, weights, self.context.config, index)
        renormalize_batchnorms(
            modules, lambda: _apply_in_batches(modules, inputs, self.context.config.batch_size)
        )
        r2 = _r2(modules, inputs, targets, self.context.config.batch_size)
        seconds = {
            "statistics": statistics_seconds,
            "importance": grouping.importance_seconds,
            "grouping": grouping.grouping_seconds,
            "fit": time.perf_counter() - clock,
        }
        return LevelReport(
            name=segment.name,
            kind=type(modules[0]).__name__.lower(),
            neurons=targets.shape[channel_dim(targets)],
            fan_in=inputs.shape[channel_dim(inputs)],
            rows=rows,
            grouping=grouping.method,
            grouping_cost=grouping.cost,
            fit_r2=r2,
            seconds=seconds,
            epochs=epochs,
        )

    def _parent_outputs(self, segment: Segment, inputs: Tensor) -> list[Tensor]:
        last = segment.modules[-1]
        return [
            capture(parent, modules[last], inputs, output=True)
            for parent, modules in zip(self.context.parents, self.parent_modules)
        ]

    def _gram(self, segment: Segment) -> tuple[Tensor, Tensor, int]:
        """ZᵀZ, ΣZ and the row count of the parents' neuron values, streamed over the calibration set."""
        gram = sums = None
        rows = 0
        with torch.no_grad():
            for inputs, _ in self.context.calibration.batches(self.context.device, self.context.dtype):
                z = torch.cat(
                    [channels_last(out) for out in self._parent_outputs(segment, inputs)], dim=1
                ).double()
                gram = z.T @ z if gram is None else gram.addmm_(z.T, z)
                sums = z.sum(0) if sums is None else sums + z.sum(0)
                rows += z.shape[0]
        return gram.cpu(), sums.cpu(), rows

    def _cache(self, segment: Segment, shares: Tensor) -> tuple[Tensor, Tensor]:
        """The fused model's inputs to the level and the group targets, for every calibration sample."""
        first = self.fused_modules[segment.modules[0]]
        shares = shares.to(self.context.device, self.context.dtype)
        inputs, targets = [], []
        with torch.no_grad():
            for batch, _ in self.context.calibration.batches(self.context.device, self.context.dtype):
                inputs.append(capture(self.context.fused, first, batch, output=False).detach())
                outputs = self._parent_outputs(segment, batch)
                dim = channel_dim(outputs[0])
                stacked = torch.cat([out.movedim(dim, -1) for out in outputs], dim=-1)
                targets.append((stacked @ shares).movedim(-1, dim))
        return torch.cat(inputs), torch.cat(targets)


def _apply(modules: list[nn.Module], x: Tensor) -> Tensor:
    for module in modules:
        x = module(x)
    return x


def _apply_in_batches(modules: list[nn.Module], inputs: Tensor, batch_size: int) -> Tensor:
    return torch.cat([_apply(modules, batch) for batch in inputs.split(batch_size)])


def _loss(modules: list[nn.Module], inputs: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """Importance-weighted mean squared error: group k's error counts S_k / mean(S)."""
    error = channels_last(_apply(modules, inputs) - targets)
    return (error.square() * weights).mean()


def _train(
    modules: list[nn.Module],
    inputs: Tensor,
    targets: Tensor,
    weights: Tensor,
    config: FusionConfig,
    index: int,
) -> int:
    """Fit the level's parameters; early stopping on held-out samples restores the best weights.

    Returns the number of epochs run. The modules stay in eval mode: BatchNorm acts with its running
    statistics (an affine map with trainable scale and shift), Dropout is off.
    """
    weights = weights.to(inputs.device, inputs.dtype)
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
    order = torch.randperm(len(inputs), generator=generator)
    held_out = int(round(len(inputs) * config.validation_fraction))
    validation, training = (
        (order[:held_out], order[held_out:]) if 0 < held_out < len(inputs) else (order, order)
    )
    parameters = [p for module in modules for p in module.parameters()]
    if not parameters:
        return 0
    optimizer = (
        torch.optim.Adam(parameters, lr=config.learning_rate)
        if config.optimizer == "adam"
        else torch.optim.SGD(parameters, lr=config.learning_rate, momentum=0.9)
    )

    def held_out_loss() -> float:
        with torch.no_grad():
            total = sum(
                _loss(modules, inputs[batch], targets[batch], weights).item() * len(batch)
                for batch in validation.split(config.batch_size)
            )
        return total / len(validation)

    best, best_state, stale, epochs_run = held_out_loss(), _state(modules), 0, 0
    with torch.enable_grad():
        for epoch in range(1, config.epochs + 1):
            epochs_run = epoch
            for batch in training[torch.randperm(len(training), generator=generator)].split(
                config.fit_batch_size
            ):
                optimizer.zero_grad()
                _loss(modules, inputs[batch], targets[batch], weights).backward()
                optimizer.step()
            current = held_out_loss()
            if current < best:
                best, best_state, stale = current, _state(modules), 0
            else:
                stale += 1
                if stale >= config.patience:
                    break
    for module, state in zip(modules, best_state):
        module.load_state_dict(state)
    return epochs_run


def _state(modules: list[nn.Module]) -> list[dict[str, Tensor]]:
    return [copy.deepcopy(module.state_dict()) for module in modules]


def _r2(modules: list[nn.Module], inputs: Tensor, targets: Tensor, batch_size: int) -> float:
    """Pooled R² of the fitted level's outputs against the targets, over every cached row."""
    with torch.no_grad():
        outputs = channels_last(_apply_in_batches(modules, inputs, batch_size)).double()
    expected = channels_last(targets).double()
    residual = (outputs - expected).square().sum()
    spread = (expected - expected.mean(0)).square().sum()
    return float(1 - residual / spread) if spread > 0 else float(residual == 0)


def _reinitialise(modules: list[nn.Module], seed: int) -> None:
    """A seeded fresh init of every submodule that knows how to reset itself."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in modules:
            for sub in module.modules():
                reset = getattr(sub, "reset_parameters", None)
                if callable(reset):
                    reset()
