"""How much each parent counts: per class in the output layer, and per parent in the hidden levels.

By default nothing is asked of the clients: the weights are estimated on the server's labelled
calibration set (`calibrated_weights`). A parent's say on class c is its mean probability of the true
class on the calibration samples of class c, sharpened by a power (2 by default) and normalised over the
parents. A client that never saw class c gives it a probability near 0 and so almost no say on it, where
a plain average of logits would let it vote on c, confidently; a client that knows c well gets most of
the say. Squaring sharpens the weights toward the experts without letting one parent take a class alone
when several know it (a product of likelihoods would, on any calibration set of more than a few samples).
A class the calibration set lacks gives no evidence either way: every parent gets an equal say on it.
The per-parent weight that scales the parents' neurons in the hidden levels is the parent's mean say over
the classes (mean 1 over the parents): a parent that knows few classes pulls less.

Weights the clients disclose (`given_weights`: example counts, or label counts) stay available.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from fedfuse.fusion.calibration import CalibrationSet
from fedfuse.fusion.parametrized import copied
from fedfuse.fusion.parent_scores import ParentScores, score_parents


@dataclass(frozen=True)
class ParentWeights:
    """How much each parent counts.

    Attributes:
        parents: ``[K]`` per-parent weights with mean 1; they multiply the importance scores of the
            parent's neurons in every hidden level.
        classes: ``[K, C]`` per-class shares of each parent in the output layer; each column sums to 1.
        source: ``"calibration"`` (estimated on the calibration set), ``"given"`` or ``"uniform"``.
    """

    parents: Tensor
    classes: Tensor
    source: str


def uniform_weights(num_parents: int, num_classes: int) -> ParentWeights:
    return ParentWeights(
        torch.ones(num_parents, dtype=torch.float64),
        torch.full((num_parents, num_classes), 1.0 / num_parents, dtype=torch.float64),
        "uniform",
    )


def calibrated_weights(scores: ParentScores, sharpness: float) -> ParentWeights:
    """Per-parent, per-class weights from what the parents do on the calibration set (see the module).

    ``sharpness`` is the power of the true-class probabilities; classes the set lacks get equal weights.
    """
    probability = scores.true_class_probability
    parents, classes = probability.shape
    present = torch.isfinite(probability).all(dim=0)
    raw = probability.nan_to_num(0.0).clamp_min(1e-12) ** sharpness
    shares = torch.where(present, raw / raw.sum(dim=0, keepdim=True), 1.0 / parents)
    per_parent = shares.mean(dim=1)
    return ParentWeights(per_parent / per_parent.mean(), shares, "calibration")


def class_weights(
    models: Sequence[nn.Module], calibration: Tensor | tuple | Iterable, sharpness: float = 2.0
) -> Tensor:
    """``[K, C]`` the per-parent, per-class weights `fuse` estimates on a labelled calibration set (each
    column sums to 1): for baselines that get the same information (a class-weighted ensemble).

    Raises:
        ValueError: the calibration set has no labels, or the models are not classifiers.
    """
    calibration_set = CalibrationSet(calibration, batch_size=256)
    if not calibration_set.has_labels:
        raise ValueError("class weights are measured on labelled calibration data; it has no labels")
    parameter = next(models[0].parameters())
    copies = [copied(model).eval() for model in models]
    with torch.no_grad():
        classes = copies[0](calibration_set.example(parameter.device, parameter.dtype)).shape[-1]
    scores = score_parents(copies, calibration_set, classes, parameter.device, parameter.dtype)
    if not bool(torch.isfinite(scores.loss).all()):
        raise ValueError("class weights need classifiers: models that output [batch, classes] logits")
    return calibrated_weights(scores, sharpness).classes


def given_weights(weights: object, num_parents: int, num_classes: int) -> ParentWeights:
    """Turn weights the clients disclosed into per-parent and per-class shares.

    Args:
        weights: a length-K sequence of positive per-parent weights, such as the clients' example
            counts; or a ``[K, C]`` array of non-negative per-parent, per-class weights, such as each
            client's label counts (the row sums then weight the parents, and each column weights that
            class's output neuron; a class no parent holds falls back to the row sums).

    Raises:
        ValueError: wrong shape, a negative or non-finite value, or a parent of weight 0.
    """
    try:
        array = torch.as_tensor(np.asarray(weights, dtype=np.float64))
    except (TypeError, ValueError) as error:
        raise ValueError(f"weights must be numbers, shaped [K] or [K, C]: {error}") from None
    if array.dim() not in (1, 2) or array.shape[0] != num_parents:
        raise ValueError(
            f"weights must have shape [{num_parents}] or [{num_parents}, C]; got {tuple(array.shape)}"
        )
    if array.dim() == 2 and array.shape[1] != num_classes:
        raise ValueError(
            f"per-class weights have {array.shape[1]} columns; the output layer has {num_classes} neurons"
        )
    if not bool(torch.isfinite(array).all()) or bool((array < 0).any()):
        raise ValueError("weights must be finite and non-negative")
    per_parent = array if array.dim() == 1 else array.sum(dim=1)
    zero = torch.nonzero(per_parent == 0).flatten()
    if len(zero):
        raise ValueError(
            f"weights of parent {int(zero[0])} are 0: a parent of weight 0 adds nothing; leave it out"
        )
    if array.dim() == 1:
        classes = (per_parent / per_parent.sum()).unsqueeze(1).expand(num_parents, num_classes).clone()
    else:
        column_totals = array.sum(dim=0, keepdim=True)
        classes = torch.where(column_totals > 0, array / column_totals.clamp_min(1e-300), 0.0)
        empty = (column_totals == 0).flatten()
        classes[:, empty] = (per_parent / per_parent.sum()).unsqueeze(1)
    return ParentWeights(per_parent / per_parent.mean(), classes, "given")
