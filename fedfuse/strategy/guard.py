"""Keeping the global model when a round's model is clearly worse on the server's calibration set.

FedAvg accepts whatever a round averages to. A fusion fits the server's labelled calibration set, so
its model is normally at least as good there as the model the clients started the round from; when it
is clearly worse, the round went wrong (clients that collapsed while training, as SGD at lr 0.1 with
momentum 0.9 made the quickstart CNN's clients do; poison the screening let through), and the clients
are better off training again from the model they had than from the wreck.

"Clearly" is McNemar's test on the calibration set, paired sample by sample: among the samples exactly
one of the two models classifies right, the new model wins ``gained`` and loses ``lost``; it is worse
when it loses more than it wins by over ``z`` standard deviations of that difference under "as good":
``lost − gained > z·√(gained + lost)``. Paired, it sees a real drop that two accuracies measured on a
few hundred samples would hide in their noise, and it scales with the calibration set by itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedfuse.fusion.calibration import CalibrationSet

#: How many standard deviations a drop must reach before the previous model is kept: about a 2.3%
#: one-sided false alarm rate when the two models are equally good.
REGRESSION_Z = 2.0


@dataclass(frozen=True)
class Comparison:
    """Two models compared on the labelled calibration set.

    Attributes:
        previous_accuracy: the share of samples the previous model classifies right, in [0, 1].
        new_accuracy: the same for the new model.
        gained: samples only the new model classifies right.
        lost: samples only the previous model classifies right.
        worse: whether the new model is significantly worse (see the module's docstring).
    """

    previous_accuracy: float
    new_accuracy: float
    gained: int
    lost: int
    worse: bool

    def describe(self) -> str:
        return (
            f"calibration accuracy {self.new_accuracy:.3f} against the previous model's "
            f"{self.previous_accuracy:.3f} (right where the previous model was wrong on {self.gained} "
            f"samples, wrong where it was right on {self.lost})"
        )


def compare(
    previous: nn.Module, new: nn.Module, calibration: CalibrationSet, z: float = REGRESSION_Z
) -> Comparison:
    """Compare ``new`` with ``previous`` on the labelled ``calibration`` set (both in eval mode, without
    gradients; both are left in the mode they came in).

    Raises:
        ValueError: the calibration set has no labels.
    """
    if not calibration.has_labels:
        raise ValueError("comparing models on the calibration set needs its labels")
    previous_right, new_right = _correct(previous, calibration), _correct(new, calibration)
    gained = int((new_right & ~previous_right).sum())
    lost = int((previous_right & ~new_right).sum())
    samples = len(previous_right)
    return Comparison(
        previous_accuracy=float(previous_right.sum()) / samples,
        new_accuracy=float(new_right.sum()) / samples,
        gained=gained,
        lost=lost,
        worse=lost - gained > z * math.sqrt(gained + lost),
    )


def _correct(model: nn.Module, calibration: CalibrationSet) -> Tensor:
    """``[N]`` bool: which calibration samples ``model`` classifies right."""
    parameter = next(model.parameters())
    was_training = model.training
    right = []
    try:
        model.eval()
        with torch.no_grad():
            for inputs, labels in calibration.batches(parameter.device, parameter.dtype):
                assert labels is not None
                right.append((model(inputs).argmax(dim=1) == labels).cpu())
    finally:
        model.train(was_training)
    return torch.cat(right)
