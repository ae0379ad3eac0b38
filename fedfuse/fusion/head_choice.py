"""Which target the output layer is fitted to, chosen by cross-validation on the labelled calibration set.

Three targets are measured (`fedfuse.fusion.config.OUTPUT_TARGETS`): the calibration labels (a linear
probe of the fused features), the class-weighted mean of the parents' logits (the paper's), and the log of
the class-weighted mean of their probabilities (the softmax ensemble's). None is best everywhere: on
issue 9's strongly non-IID MNIST grid the labels were best, and the logits of a parent that never saw a
class vote on it confidently; for independently initialised clients on IID data the labels head, a probe
fitted on a few hundred samples, came out 1.5-4 points below the logits head (small BatchNorm CNNs on
digits, found by probing). So the head is fitted to each target on all but one fold of the calibration
samples and scored on the fold left out, for every fold. The labels stay unless another target classifies
significantly more held-out samples right (McNemar's paired test on the samples one gets right and the
other wrong, at `SIGNIFICANCE` standard deviations, as the strategy's guard): a few hundred samples leave
differences of a point or two to chance, and on issue 9's K = 10, alpha = 0.5 cell the most accurate
target by a hair (the logits, in all six runs) was no better on the test set. Among several significant
ones the most accurate wins, ties going to the earlier of `CANDIDATES`.
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
#: Standard deviations by which another target must beat the labels (McNemar's paired test).
SIGNIFICANCE = 2.0


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
    right = {name: torch.zeros(len(labels), dtype=torch.bool, device=features.device) for name in targets}
    for fold in range(min(FOLDS, len(labels))):
        held = folds == fold
        for name, target in targets.items():
            stats = LevelStatistics(features.shape[1], target.shape[1], features.device)
            stats.add(features[~held], target[~held])
            fit = solve_level(stats, ridge, with_bias, prior)
            predicted = (features[held] @ fit.weight + fit.bias).argmax(dim=1)
            right[name][held] = predicted == labels[held].to(predicted.device)
    order = [name for name in CANDIDATES if name in targets]
    better = [
        name for name in order if name == "labels" or _significantly_better(right[name], right["labels"])
    ]
    best = max(better, key=lambda name: (int(right[name].sum()), -order.index(name)))
    return HeadChoice(best, {name: float(right[name].double().mean()) for name in order})


def _significantly_better(right: Tensor, reference: Tensor) -> bool:
    """McNemar's paired test: more samples right only here than only in ``reference``, by over
    `SIGNIFICANCE` standard deviations of their difference."""
    gained, lost = int((right & ~reference).sum()), int((reference & ~right).sum())
    return gained - lost > SIGNIFICANCE * (gained + lost) ** 0.5
