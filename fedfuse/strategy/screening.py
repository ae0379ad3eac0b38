"""Screening client models on the server's calibration set before they are fused.

A reply can be well formed and still poison the fusion: random weights, weights scaled by 1e13, a model
trained on flipped labels. The server holds labelled data, so it *tests* every client's model there
first (one forward pass over the calibration set) and leaves out the ones that are useless or out of line
with the rest. The rule must not leave out honest non-IID specialists: a client that saw only three
classes predicts those three and nothing else, which makes it look poor by plain accuracy or loss.

The rule, per client, on the calibration set:

1. **Finite activations.** Every module's output must be finite on every calibration input; a model that
   overflows (weights x1e20 in float32) would put NaN into every fit.
2. **Competence above chance.** For each class c, the client's *informedness*
   ``J_c = P(predicts c | class c) - P(predicts c | another class)`` (Youden's J: 1 for a perfect
   detector of c, 0 for any prediction that ignores the input, constant or random, whatever its class
   prior). The client's competence is the mean of its ``competent_classes`` best ``J_c``: a specialist
   is judged on the classes it knows, so knowing 2 or 3 classes well passes, as it should. Random
   weights and a model trained on permuted labels are near or below 0 there (the latter is right on no
   class). The client is left out below ``min_competence``.
3. **Output scale in line.** The root mean square of the client's logits must not exceed
   ``max_scale_ratio`` times the reference scale: the lower median of the clients' scales (the lower of
   the two middle values, so that with two clients the larger, not both, is out of line, and any
   minority of inflated models cannot move it). Honest clients differ by a small factor; a model
   scaled up, even one that still classifies, would dominate every activation-matching fit. Small
   scales are left alone: a weakly trained client is not dangerous, it merely counts for less.

Without labels only rules 1 and 3 apply. Every figure is kept for the log and the round's metrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from fedfuse.fusion.calibration import CalibrationSet


@dataclass(frozen=True)
class ScreeningRule:
    """The thresholds of the screening rule (see the module's docstring).

    Attributes:
        min_competence: the least mean informedness over a client's best classes, in [-1, 1]; 0 is
            chance. Measured (docs/flower.md): honest clients of Dirichlet 0.1 partitions score 0.5 to
            0.96 (0.19 for one of 27 digits examples); random or sign-flipped weights 0 to 0.1, the
            most a useless model reaches by luck on 20 calibration samples a class.
        competent_classes: how many of its best classes a client is judged on (at least 1).
        max_scale_ratio: how many times the reference scale a client's logits may reach (more than 1).
    """

    min_competence: float = 0.15
    competent_classes: int = 2
    max_scale_ratio: float = 10.0

    def __post_init__(self) -> None:
        if not -1.0 <= self.min_competence <= 1.0:
            raise ValueError(f"min_competence must lie in [-1, 1], got {self.min_competence}")
        if not isinstance(self.competent_classes, int) or self.competent_classes < 1:
            raise ValueError(f"competent_classes must be a positive int, got {self.competent_classes!r}")
        if not self.max_scale_ratio > 1.0 or not math.isfinite(self.max_scale_ratio):
            raise ValueError(f"max_scale_ratio must be a finite number above 1, got {self.max_scale_ratio}")


@dataclass(frozen=True)
class ClientFigures:
    """What the server measured of one client's model on its calibration set.

    Attributes:
        node_id: the client's node.
        finite: every module's output was finite on every calibration input.
        loss: mean cross-entropy on the labelled samples, in nats (NaN without labels or if not finite).
        accuracy: share of the labelled samples predicted right (NaN without labels).
        informedness: ``[C]`` per-class J (NaN for a class the calibration set lacks, or without labels).
        competence: mean of the ``competent_classes`` largest ``J_c`` (NaN without labels).
        logit_scale: root mean square of the logits (inf if not finite).
    """

    node_id: int
    finite: bool
    loss: float
    accuracy: float
    informedness: np.ndarray
    competence: float
    logit_scale: float

    def describe(self) -> str:
        """The figures for a log line: ``loss 2.31, accuracy 0.10, competence -0.01, logit scale 3.2e+01``."""
        if not self.finite:
            return "non-finite activations on the calibration set"
        return (
            f"loss {self.loss:.3g}, accuracy {self.accuracy:.3f}, competence {self.competence:.3f}, "
            f"logit scale {self.logit_scale:.3g}"
        )


@dataclass(frozen=True)
class Screening:
    """The decision on every client, in the order measured.

    Attributes:
        figures: what was measured of each client.
        reasons: per client, None when kept, else why it is left out (with the figures that decided).
        reference_scale: the reference logit scale (the lower median); NaN when no client was finite.
    """

    figures: list[ClientFigures]
    reasons: list[str | None]
    reference_scale: float

    @property
    def kept(self) -> list[int]:
        return [k for k, reason in enumerate(self.reasons) if reason is None]

    @property
    def left_out(self) -> list[int]:
        return [k for k, reason in enumerate(self.reasons) if reason is not None]

    def suspicion_order(self) -> list[int]:
        """Clients from the most to the least suspect: left out first, then by how far their scale
        exceeds the reference, then by lowest competence. Used to find the client behind a failure."""

        def key(k: int) -> tuple[bool, float, float]:
            figures = self.figures[k]
            scale = figures.logit_scale / self.reference_scale if self.reference_scale > 0 else 0.0
            competence = figures.competence if math.isfinite(figures.competence) else 0.0
            return (self.reasons[k] is None, -scale, competence)

        return sorted(range(len(self.figures)), key=key)


def measure(
    models: Sequence[nn.Module],
    node_ids: Sequence[int],
    calibration: CalibrationSet,
    classes: int,
    rule: ScreeningRule,
) -> list[ClientFigures]:
    """One pass of every model (in eval mode, without gradients) over the calibration set.

    Args:
        models: the clients' models, ``[batch, ...] -> [batch, classes]`` logits.
        node_ids: the clients' node ids, one per model.
        calibration: the server's calibration set, with or without labels.
        classes: the models' number of outputs.
        rule: its ``competent_classes`` says how many best classes make the competence.
    """
    return [
        _measure_one(model, node, calibration, classes, rule.competent_classes)
        for model, node in zip(models, node_ids, strict=True)
    ]


def screen(figures: Sequence[ClientFigures], rule: ScreeningRule) -> Screening:
    """Apply the rule (see the module's docstring) to every client's figures."""
    finite_scales = sorted(f.logit_scale for f in figures if f.finite)
    reference = finite_scales[(len(finite_scales) - 1) // 2] if finite_scales else float("nan")
    reasons: list[str | None] = []
    for figure in figures:
        if not figure.finite:
            reasons.append("non-finite activations on the calibration set")
        elif math.isfinite(figure.competence) and figure.competence < rule.min_competence:
            reasons.append(
                f"no better than chance on the calibration set: competence {figure.competence:.3f} "
                f"(mean informedness of its {rule.competent_classes} best classes) is below "
                f"{rule.min_competence:g}; {figure.describe()}"
            )
        elif figure.logit_scale > rule.max_scale_ratio * reference:
            reasons.append(
                f"output scale out of line: logits of RMS {figure.logit_scale:.3g}, "
                f"{figure.logit_scale / reference:.3g} times the clients' median {reference:.3g} (at most "
                f"{rule.max_scale_ratio:g}); {figure.describe()}"
            )
        else:
            reasons.append(None)
    return Screening(list(figures), reasons, reference)


def _measure_one(
    model: nn.Module, node_id: int, calibration: CalibrationSet, classes: int, competent_classes: int
) -> ClientFigures:
    parameter = next(model.parameters())
    finite = True

    def check(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal finite
        if (
            isinstance(output, Tensor)
            and output.is_floating_point()
            and not bool(torch.isfinite(output).all())
        ):
            finite = False

    # Confusion counts [true class, predicted class], the loss, and the logits' sum of squares.
    confusion = torch.zeros(classes, classes, dtype=torch.float64)
    loss, squares, samples = 0.0, 0.0, 0
    was_training = model.training
    hooks = [module.register_forward_hook(check) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            for inputs, labels in calibration.batches(parameter.device, parameter.dtype):
                logits = model(inputs).double().cpu()
                samples += len(inputs)
                squares += float(logits.square().mean(1).sum())
                if labels is not None and finite:
                    labels = labels.cpu()
                    loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
                    predicted = logits.argmax(1)
                    confusion.index_put_(
                        (labels, predicted), torch.ones(len(labels), dtype=torch.float64), True
                    )
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if not finite or not math.isfinite(squares):
        nan = float("nan")
        return ClientFigures(node_id, False, nan, nan, np.full(classes, nan), nan, float("inf"))
    scale = math.sqrt(squares / samples)
    labelled = confusion.sum()
    if not calibration.has_labels or labelled == 0:
        nan = float("nan")
        return ClientFigures(node_id, True, nan, nan, np.full(classes, nan), nan, scale)
    informedness = _informedness(confusion)
    best = np.sort(informedness[np.isfinite(informedness)])[::-1][:competent_classes]
    return ClientFigures(
        node_id=node_id,
        finite=True,
        loss=loss / float(labelled),
        accuracy=float(confusion.diagonal().sum() / labelled),
        informedness=informedness,
        competence=float(best.mean()) if len(best) else float("nan"),
        logit_scale=scale,
    )


def _informedness(confusion: Tensor) -> np.ndarray:
    """Per-class Youden's J from a confusion matrix ``[true, predicted]``: the true-positive rate minus
    the false-positive rate of predicting c; NaN for a class without samples (or with no other class)."""
    counts = confusion.sum(1)
    predicted = confusion.sum(0)
    hits = confusion.diagonal()
    others = counts.sum() - counts
    true_positive = torch.where(counts > 0, hits / counts.clamp_min(1), float("nan"))
    false_positive = torch.where(others > 0, (predicted - hits) / others.clamp_min(1), float("nan"))
    return (true_positive - false_positive).numpy()
