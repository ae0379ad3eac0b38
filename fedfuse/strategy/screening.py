"""Screening client models on the server's calibration set before they are fused.

A reply can be well formed and still poison the fusion: random weights, weights scaled by 1e13, a model
trained on flipped labels. The server holds labelled data, so it *tests* every client's model there
first (one forward pass over the calibration set) and leaves out the ones that are useless or out of line
with the rest. The rule must not leave out honest non-IID specialists: a client that saw only three
classes predicts those three and nothing else, which makes it look poor by plain accuracy or loss.

The rule, per client, on the calibration set:

1. **Finite activations.** Every module's output must be finite on every calibration input; a model that
   overflows (weights x1e20 in float32) would put NaN into every fit.
2. **Competence above chance on some class.** A client is competent on class c when it *predicts* c
   for most of class c's samples (``recall_c >= min_recall``) and *ranks* them first: its competence on
   c is then ``J_c = 2 AUC_c - 1``, where ``AUC_c`` is the probability that the model gives class c a
   higher probability on a sample of class c than on a sample of another class (ties half; Youden's J
   averaged over thresholds: 0 for any output that ignores the input, 1 for perfect separation). On a
   class it does not predict for most of its samples, its competence is at most 0 (chance). The
   client's competence is the mean over its ``competent_classes`` best classes: a specialist is judged on
   the classes it knows, so one that saw a single class and predicts it for every input passes (its
   probability of that class is still highest on that class's samples), as it should. A model trained
   on permuted labels ranks, but predicts no class right; a constant model predicts one class, but
   ranks at chance. The client is left out below ``min_competence``.
3. **Output scale in line.** The root mean square of the client's logits must not exceed
   ``max_scale_ratio`` times the reference scale: the median in log scale of the scales of the clients
   that pass rules 1 and 2 (the middle value, or the geometric mean of the two middle values). Honest
   clients differ by a small factor; a model scaled up, even one that still classifies, would dominate
   every activation-matching fit. Small scales are left alone: a weakly trained client is not
   dangerous, it merely counts for less. The reference is taken over competent clients only, so that
   useless ones (a free rider returning the untrained model it was sent) cannot set it; and as a median
   in log scale, so that no minority on either side moves it and half the clients can move it only
   half-way (in log scale) toward themselves: with half the clients free riders, or half trained far
   less than the rest, a lower median (the weak half's scale) left the other half out of line.
4. **Weights in line.** The norm of each of the client's weight matrices (every parameter of two or more
   dimensions) must not exceed ``max_scale_ratio`` times the median in log scale of the competent
   clients' norms of that matrix. This is what the calibration set cannot show: a neuron that never
   fires on it (a large negative bias) but carries enormous outgoing weights leaves every figure above
   honest, yet fusion regroups it with live neurons, which wakes it, and its weights with it (one of
   1e37 came back as 2.9e38 in the fused model, and two such clients failed every fusion). Biases and
   other vectors are left to rules 1-3: theirs shows on the calibration set, and a small bias can
   honestly differ by more.

Without labels only rules 1, 3 and 4 apply. Every figure is kept for the log and the round's metrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor, nn

from fedfuse.fusion.calibration import CalibrationSet


@dataclass(frozen=True)
class ScreeningRule:
    """The thresholds of the screening rule (see the module's docstring).

    Attributes:
        min_competence: the least competence (``J_c`` on a client's best classes), in [-1, 1]; 0 is
            chance. Measured (docs/benchmarks.md): honest MNIST clients of Dirichlet 0.1 to 0.5
            partitions score 0.29 at the lowest (a client that saw one class); label-flipped models 0
            or below, unless they are specialists, which are indistinguishable from honest specialists
            of the shifted classes.
        min_recall: the share of a class's samples a client must predict as that class for its ranking
            of the class to count, in (0, 1].
        competent_classes: how many of its best classes a client is judged on (at least 1).
        max_scale_ratio: how many times the reference a client's logit scale, and the norm of each of its
            weight matrices, may reach (more than 1).
    """

    min_competence: float = 0.2
    min_recall: float = 0.5
    competent_classes: int = 1
    max_scale_ratio: float = 10.0

    def __post_init__(self) -> None:
        if not -1.0 <= self.min_competence <= 1.0:
            raise ValueError(f"min_competence must lie in [-1, 1], got {self.min_competence}")
        if not 0.0 < self.min_recall <= 1.0:
            raise ValueError(f"min_recall must lie in (0, 1], got {self.min_recall}")
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
        informedness: ``[C]`` per-class ``J_c = 2 AUC_c - 1`` (NaN for a class the calibration set lacks,
            or without labels).
        recall: ``[C]`` per-class share of the class's samples predicted as that class (NaN likewise).
        competence: mean of the ``competent_classes`` largest per-class competences: ``J_c`` where
            ``recall_c >= min_recall``, else ``min(J_c, 0)`` (NaN without labels).
        logit_scale: root mean square of the logits (inf if not finite).
        weight_norms: per weight matrix (parameter of two or more dimensions), its Frobenius norm.
    """

    node_id: int
    finite: bool
    loss: float
    accuracy: float
    informedness: np.ndarray
    recall: np.ndarray
    competence: float
    logit_scale: float
    weight_norms: dict[str, float] = field(default_factory=dict)

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
        reference_scale: the reference logit scale (rule 3's median); NaN when no client was finite.
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
        rule: its ``min_recall`` and ``competent_classes`` define the competence.
    """
    return [
        replace(_measure_one(model, node, calibration, classes, rule), weight_norms=_weight_norms(model))
        for model, node in zip(models, node_ids, strict=True)
    ]


def screen(figures: Sequence[ClientFigures], rule: ScreeningRule) -> Screening:
    """Apply the rule (see the module's docstring) to every client's figures."""
    finite = [f for f in figures if f.finite]
    competent = [f for f in finite if not f.competence < rule.min_competence] or finite  # NaN: unlabelled
    reference = log_median([f.logit_scale for f in competent]) if competent else float("nan")
    reference_norms = median_norms([f.weight_norms for f in competent])
    reasons: list[str | None] = []
    for figure in figures:
        if not figure.finite:
            reasons.append("non-finite activations on the calibration set")
        elif math.isfinite(figure.competence) and figure.competence < rule.min_competence:
            reasons.append(
                f"no better than chance on the calibration set: competence {figure.competence:.3f} "
                f"(ranking informedness on its {rule.competent_classes} best "
                f"class{'es' if rule.competent_classes > 1 else ''} among those it predicts for at least "
                f"{rule.min_recall:.0%} of their samples) is below "
                f"{rule.min_competence:g}; {figure.describe()}"
            )
        elif figure.logit_scale > rule.max_scale_ratio * reference:
            reasons.append(
                f"output scale out of line: logits of RMS {figure.logit_scale:.3g}, "
                f"{figure.logit_scale / reference:.4g} times the clients' median {reference:.3g} (at most "
                f"{rule.max_scale_ratio:g}); {figure.describe()}"
            )
        elif outlier := _weights_out_of_line(figure.weight_norms, reference_norms, rule.max_scale_ratio):
            reasons.append(f"{outlier}; {figure.describe()}")
        else:
            reasons.append(None)
    return Screening(list(figures), reasons, reference)


def _weight_norms(model: nn.Module) -> dict[str, float]:
    """The Frobenius norm of each weight matrix, in float64 (a float32 norm of 3e38 entries overflows)."""
    return {
        name: float(parameter.detach().double().norm())
        for name, parameter in model.named_parameters()
        if parameter.dim() >= 2
    }


def log_median(values: Sequence[float]) -> float:
    """The median of positive ``values`` in log scale: the middle value, or the geometric mean of the two
    middle values (0 when either is 0)."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return math.sqrt(ordered[middle - 1]) * math.sqrt(ordered[middle])


def median_norms(norms: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per weight matrix, the `log_median` of the clients' norms of it (rule 4)."""
    names = {name for client in norms for name in client}
    return {name: log_median([client[name] for client in norms if name in client]) for name in names}


def _weights_out_of_line(norms: dict[str, float], reference: dict[str, float], ratio: float) -> str | None:
    """Why the weights are out of line (rule 4), naming the matrix furthest out, or None."""
    excess = {
        name: norm / reference[name]
        for name, norm in norms.items()
        if reference.get(name, 0.0) > 0 and norm > ratio * reference[name]
    }
    if not excess:
        return None
    name = max(excess, key=lambda key: excess[key])
    return (
        f"weights out of line: '{name}' has norm {norms[name]:.3g}, {excess[name]:.4g} times the clients' "
        f"median {reference[name]:.3g} (at most {ratio:g})"
    )


def _measure_one(
    model: nn.Module, node_id: int, calibration: CalibrationSet, classes: int, rule: ScreeningRule
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

    # The labelled samples' log-probabilities (one model's [N, C] at a time), the loss, and the logits'
    # sum of squares.
    log_probabilities, all_labels = [], []
    loss, squares, samples = 0.0, 0.0, 0
    was_training = model.training
    hooks = [module.register_forward_hook(check) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            for inputs, labels in calibration.batches(parameter.device, parameter.dtype):
                logits = model(inputs).double().cpu().reshape(len(inputs), -1)  # [N] for one output
                samples += len(inputs)
                squares += float(logits.square().mean(1).sum())
                if labels is not None and finite:
                    labels = labels.cpu()
                    loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
                    log_probabilities.append(torch.log_softmax(logits, dim=1))
                    all_labels.append(labels)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if not finite or not math.isfinite(squares):
        nan = float("nan")
        return ClientFigures(
            node_id, False, nan, nan, np.full(classes, nan), np.full(classes, nan), nan, float("inf")
        )
    scale = math.sqrt(squares / samples)
    if not all_labels:
        nan = float("nan")
        return ClientFigures(
            node_id, True, nan, nan, np.full(classes, nan), np.full(classes, nan), nan, scale
        )
    scores, labels = torch.cat(log_probabilities).numpy(), torch.cat(all_labels).numpy()
    informedness = _informedness(scores, labels)
    predicted = scores.argmax(1)
    recall = np.array(
        [(predicted[labels == c] == c).mean() if (labels == c).any() else np.nan for c in range(classes)]
    )
    per_class = np.where(recall >= rule.min_recall, informedness, np.minimum(informedness, 0.0))
    best = np.sort(per_class[np.isfinite(per_class)])[::-1][: rule.competent_classes]
    return ClientFigures(
        node_id=node_id,
        finite=True,
        loss=loss / len(labels),
        accuracy=float((predicted == labels).mean()),
        informedness=informedness,
        recall=recall,
        competence=float(best.mean()) if len(best) else float("nan"),
        logit_scale=scale,
    )


def _informedness(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per class c, ``2 AUC - 1`` of the model's log-probability of c as a detector of class c.

    AUC is the probability that a sample of class c gets a higher score than a sample of another class
    (ties count half), so ``2 AUC - 1`` is Youden's J averaged over every threshold: 0 for a score that
    ignores the input, 1 for perfect separation, below 0 for a detector of something else. Ranking, not
    the argmax, is what makes a specialist competent: a client that saw one class predicts it for every
    input, yet its probability of that class is still higher on that class's samples.

    Args:
        scores: ``[N, C]`` log-probabilities of the labelled calibration samples.
        labels: ``[N]`` their classes.

    Returns:
        ``[C]``, NaN for a class without samples or without samples of other classes.
    """
    informedness = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        positive = labels == c
        positives, negatives = int(positive.sum()), int((~positive).sum())
        if positives == 0 or negatives == 0:
            continue
        ranks = rankdata(scores[:, c])  # average ranks: ties count half
        auc = (ranks[positive].sum() - positives * (positives + 1) / 2) / (positives * negatives)
        informedness[c] = 2 * auc - 1
    return informedness
