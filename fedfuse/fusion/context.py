"""What every level of one `fuse` call works with, whichever the variant."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedfuse.fusion.calibration import CalibrationSet
from fedfuse.fusion.config import FusionConfig
from fedfuse.fusion.parents import ParentWeights


@dataclass(frozen=True)
class FusionContext:
    """One fusion's inputs, prepared.

    Attributes:
        parents: private eval-mode copies of the parent models (attribution hooks land on these).
        fused: the model being fitted, level by level (a copy of parent 0).
        calibration: the calibration set, as batches.
        config: the fusion's configuration.
        weights: per-parent and per-class weights.
        device, dtype: where and in what precision the models compute.
    """

    parents: list[nn.Module]
    fused: nn.Module
    calibration: CalibrationSet
    config: FusionConfig
    weights: ParentWeights
    device: torch.device
    dtype: torch.dtype
