"""What every level of one `fuse` call works with, whichever the variant."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fedfuse.fusion.calibration import CalibrationSet
from fedfuse.fusion.config import FusionConfig
from fedfuse.fusion.levels import Level, LevelPlan, Space
from fedfuse.fusion.reading import CHECKPOINT_VALUES, At, Collected, Reader
from fedfuse.fusion.targets import SpaceGrouping
from fedfuse.fusion.weights import ParentWeights

#: The most values (samples × positions × neurons, over all parents) one chunk of a level's pass holds:
#: 2²² float64 values are 32 MiB, whatever K and the batch size (`FusionContext.chunks`).
CHUNK_VALUES = 1 << 22


@dataclass(frozen=True)
class FusionContext:
    """One fusion's inputs, prepared.

    Attributes:
        parents: private eval-mode copies of the parent models (attribution hooks land on these).
        fused: the model being fitted, level by level (a copy of parent 0, resized when asked).
        calibration: the calibration set, as batches.
        config: the fusion's configuration.
        weights: per-parent and per-class weights.
        plan: the parents' levels; fused_plan: the fused model's (the same but for widths).
        parent_reader, fused_reader: read values inside the parents and the fused model.
        device, dtype: where and in what precision the models compute.
        groupings: each space's grouping once decided, by space name (a stream's levels share it).
        stream_targets: the parents' values at the targets of a stream's levels (the residual sums they
            complete), by place, then by id of the parent: one tensor per calibration batch
            (`collecting_targets`).
        sizes: `values_per_sample` by places, once measured.
        importance: each parent's importance scores by (id of the parent, place), once measured.
    """

    parents: list[nn.Module]
    fused: nn.Module
    calibration: CalibrationSet
    config: FusionConfig
    weights: ParentWeights
    plan: LevelPlan
    fused_plan: LevelPlan
    parent_reader: Reader
    fused_reader: Reader
    device: torch.device
    dtype: torch.dtype
    groupings: dict[str, SpaceGrouping] = field(default_factory=dict)
    stream_targets: dict[str, dict[int, list[Tensor]]] = field(default_factory=dict)
    sizes: dict[tuple[str, ...], int] = field(default_factory=dict)
    importance: dict[tuple[int, str], Tensor] = field(default_factory=dict)

    def fused_level(self, level: Level) -> Level:
        """``level`` as it is in the fused model (its width resized when the fused model is)."""
        return next(other for other in self.fused_plan.levels if other.name == level.name)

    def chunks(self, places: Sequence[str]) -> Iterator[tuple[Tensor, Tensor | None, At]]:
        """The calibration batches, split so that every parent's values at ``places`` on one chunk number at
        most `CHUNK_VALUES` (a convolution has a value per position): a level's pass then holds
        O(CHUNK_VALUES) values at a time, whatever K and the batch size. Each chunk comes with where it
        lies (`fedfuse.fusion.reading.At`), for reads from a checkpoint."""
        samples = max(1, CHUNK_VALUES // max(1, self.values_per_sample(places) * len(self.parents)))
        for index, (inputs, labels) in enumerate(self.calibration.batches(self.device, self.dtype)):
            for start in range(0, len(inputs), samples):
                chunk = slice(start, start + samples)
                yield inputs[chunk], None if labels is None else labels[chunk], (index, chunk)

    def values_per_sample(self, places: Sequence[str]) -> int:
        """How many values one calibration sample gives at ``places`` in one parent (measured once per
        set of places: a run of parent 0 on two samples, as a BatchNorm without running statistics needs)."""
        key = tuple(places)
        if key not in self.sizes:
            example = self.calibration.example(self.device, self.dtype, size=2)  # a batch norm needs two
            with torch.no_grad():
                values = self.parent_reader.read(self.parents[0], example, places)
            self.sizes[key] = sum(value[:1].numel() for value in values)
        return self.sizes[key]

    def _fit_the_budget(self, places: Sequence[str]) -> bool:
        """Whether every parent's values at ``places`` over the calibration set fit `CHECKPOINT_VALUES`."""
        total = self.values_per_sample(places) * len(self.parents) * self.calibration.num_samples
        return total <= CHECKPOINT_VALUES

    def advance(self, level: Level) -> None:
        """Checkpoint every parent and the fused model at ``level``'s input (`Reader.advance`), so that the
        level's passes run each of them from there, once."""
        readers = [(self.parent_reader, parent) for parent in self.parents] + [
            (self.fused_reader, self.fused)
        ]
        for reader, model in readers:
            batches = (inputs for inputs, _ in self.calibration.batches(self.device, self.dtype))
            reader.advance(model, level.input, batches)

    def collecting(self, place: str) -> Collected | None:
        """Something to collect the parents' values at ``place`` in over the coming pass, to become their
        checkpoints (`keep`); None when the parents already stand there, or when the values would not fit
        the checkpoint budget (so that collecting them never holds more than it)."""
        if self.plan.graph is None or place in self.parent_reader.cut(self.parents[0]):
            return None
        fits = self._fit_the_budget([place])
        return Collected() if fits else None

    def collecting_targets(self, space: Space) -> dict[str, Collected]:
        """Something to collect the parents' values in, over a stream's grouping pass, at the targets of its
        levels: every level of a stream fits to the sum it completes, which the parents would otherwise
        run again for each of them. Kept (`stream_targets`) while they fit in `CHECKPOINT_VALUES` values,
        beside the checkpoints; nothing for a space of one point (its values become checkpoints)."""
        if len(space.points) == 1:
            return {}
        targets = list(
            dict.fromkeys(level.target for level in self.plan.levels if level.name in space.levels)
        )
        return {place: Collected() for place in targets} if self._fit_the_budget(targets) else {}

    def keep_targets(self, collected: dict[str, Collected]) -> None:
        """Keep the parents' values collected at a stream's targets for its levels' fits."""
        for place, values in collected.items():
            self.stream_targets[place] = {id(parent): values.batches(parent) for parent in self.parents}

    def forget_targets(self, space: Space) -> None:
        """Drop a stream's kept targets once its last level is fitted."""
        for level in self.plan.levels:
            if level.name in space.levels:
                self.stream_targets.pop(level.target, None)

    def keep(self, collected: Collected | None, place: str) -> None:
        """Make the parents' values collected over a pass their checkpoints at ``place``."""
        if collected is not None:
            for parent in self.parents:
                self.parent_reader.keep(parent, place, collected.batches(parent))

    def run_fused(self, place: str) -> None:
        """One pass of the fused model over the calibration set, as far as ``place`` (for what hooks on
        its modules collect)."""
        with torch.no_grad():
            for inputs, _, at in self.chunks([place]):
                self.fused_reader.read(self.fused, inputs, [place], at)

    def groups(self, space: str) -> int:
        """The fused neurons of a space."""
        return self.fused_plan.spaces[space].width
