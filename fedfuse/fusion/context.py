"""What every level of one `fuse` call works with, whichever the variant."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fedfuse.fusion.calibration import CalibrationSet
from fedfuse.fusion.config import FusionConfig
from fedfuse.fusion.levels import Level, LevelPlan
from fedfuse.fusion.reading import Reader
from fedfuse.fusion.targets import SpaceGrouping
from fedfuse.fusion.weights import ParentWeights


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

    def fused_level(self, level: Level) -> Level:
        """``level`` as it is in the fused model (its width resized when the fused model is)."""
        return next(other for other in self.fused_plan.levels if other.name == level.name)

    def groups(self, space: str) -> int:
        """The fused neurons of a space."""
        return self.fused_plan.spaces[space].width
