"""Which target the output layer is fitted to, chosen by cross-validation on the labelled calibration set.

Three targets are measured (`fedfuse.fusion.config.OUTPUT_TARGETS`): the calibration labels (a linear
probe of the fused features), the class-weighted mean of the parents' logits (the paper's), and the log of
the class-weighted mean of their probabilities (the softmax ensemble's). None is best everywhere: on
issue 9's strongly non-IID MNIST grid the labels were best, and the logits of a parent that never saw a
class vote on it confidently; for independently initialised clients on IID data the labels head, a probe
fitted on a few hundred samples, came out 1.5-4 points below the logits head (small BatchNorm CNNs on
digits, found by probing). So the head is fitted to each target on all but one fold of the calibration
samples and scored on the fold left out, for every fold; the target with the most held-out samples right
is fitted on them all. Ties go to the earlier of `CANDIDATES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedfuse.fusion.fitting import solve_level
from fedfuse.fusion.statistics import LevelStatistics

#: The targets compared, in the order ties are broken.
CANDIDATES = ("labels", "log_probabilities", "logits")
#: Folds of the calibration samples (sample i is in fold i mod FOLDS).
FOLDS = 5


@dataclass(frozen=True)
class HeadChoice:
    """The target chosen, and each target's held-out accuracy (share of the calibration samples right
    when their fold was left out of the fit)."""

    target: str
    accuracy: dict[str, float]


def choose_head(
    features: Tensor,
    targets: dict[str, Tensor],
    labels: Tensor,
    ridge: float,
    with_bias: bool,
    prior: Tensor | None,
) -> HeadChoice:
    """Cross-validate the output layer's fit to each target.

    Args:
        features: ``[N, d]`` the fused model's inputs to the output layer, one row per sample.
        targets: by name (`CANDIDATES`), ``[N, C]`` the layer's targets on the same rows.
        labels: ``[N]`` the samples' classes.
        ridge, with_bias, prior: as for the layer's own fit (`fedfuse.fusion.fitting.solve_level`).
    """
    folds = torch.arange(len(labels), device=features.device) % FOLDS
    right = dict.fromkeys(targets, 0)
    for fold in range(min(FOLDS, len(labels))):
        held = folds == fold
        for name, target in targets.items():
            stats = LevelStatistics(features.shape[1], target.shape[1], features.device)
            stats.add(features[~held], target[~held])
            fit = solve_level(stats, ridge, with_bias, prior)
            predicted = (features[held] @ fit.weight + fit.bias).argmax(dim=1)
            right[name] += int((predicted == labels[held].to(predicted.device)).sum())
    order = [name for name in CANDIDATES if name in targets]
    best = max(order, key=lambda name: (right[name], -order.index(name)))
    return HeadChoice(best, {name: right[name] / len(labels) for name in order})
