"""What the server measures of each parent on its own calibration set, before fusing anything.

One forward pass of every parent over the calibration set gives, per parent: its loss, the probability it
gives the true class of each class's samples, and the scale of its outputs. They weight the output layer
without asking the clients anything (`fedfuse.fusion.weights`), and put the parents in an order that
depends on what they compute, not on the order they arrived in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedfuse.fusion.calibration import CalibrationSet


@dataclass(frozen=True)
class ParentScores:
    """Each parent's behaviour on the calibration set.

    Attributes:
        loss: ``[K]`` mean cross-entropy on the labelled calibration samples, in nats (NaN without labels).
        true_class_probability: ``[K, C]`` for each class c, the mean over the calibration samples of
            class c of the probability the parent gives class c (NaN where the set has no sample of c).
        class_counts: ``[C]`` calibration samples of each class (zeros without labels).
        entropy: ``[K]`` mean entropy of the parent's predictions, in nats.
        logit_scale: ``[K]`` root mean square of the parent's logits.
    """

    loss: Tensor
    true_class_probability: Tensor
    class_counts: Tensor
    entropy: Tensor
    logit_scale: Tensor

    def order(self, parents: Sequence[nn.Module]) -> list[int]:
        """The parents' indices sorted by what they compute: calibration loss (or, without labels,
        prediction entropy), ties broken by the sum of squares of the parameters. Arrival order plays no
        part, so permuting the parents permutes nothing in the fusion."""
        keys = self.loss if bool(torch.isfinite(self.loss).all()) else self.entropy.nan_to_num(0.0)
        checksums = [
            float(sum(p.detach().double().square().sum() for p in parent.parameters())) for parent in parents
        ]
        return sorted(range(len(parents)), key=lambda k: (float(keys[k]), checksums[k]))

    def reordered(self, order: Sequence[int]) -> ParentScores:
        index = torch.as_tensor(list(order))
        return ParentScores(
            self.loss[index],
            self.true_class_probability[index],
            self.class_counts,
            self.entropy[index],
            self.logit_scale[index],
        )


def score_parents(
    parents: Sequence[nn.Module],
    calibration: CalibrationSet,
    classes: int,
    device: torch.device,
    dtype: torch.dtype,
) -> ParentScores:
    """One pass of every parent (eval mode) over the calibration set.

    Parents whose outputs are not ``[batch, classes]`` logits all get NaN scores (they are then ordered
    by their parameters alone, and weighted by the caller's weights).

    Raises:
        ValueError: a parent's outputs are not finite on some calibration input (its weights are finite,
            but its activations overflow): every fit of every level would be NaN.
    """
    parents_count = len(parents)
    loss = torch.zeros(parents_count, dtype=torch.float64)
    probability = torch.zeros(parents_count, classes, dtype=torch.float64)
    counts = torch.zeros(classes, dtype=torch.float64)
    entropy = torch.zeros(parents_count, dtype=torch.float64)
    squares = torch.zeros(parents_count, dtype=torch.float64)
    samples = 0
    undefined = torch.full((parents_count,), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        for inputs, labels in calibration.batches(device, dtype):
            samples += len(inputs)
            if labels is not None:
                counts += torch.bincount(labels.cpu(), minlength=classes).double()
            for k, parent in enumerate(parents):
                logits = parent(inputs)
                if logits.dim() != 2 or logits.shape[1] != classes:
                    return ParentScores(
                        undefined, undefined[:, None].expand(-1, classes), counts * 0, undefined, undefined
                    )
                if not bool(torch.isfinite(logits).all()):
                    raise ValueError(
                        f"parent {k}'s outputs on the calibration set are not finite (its activations "
                        "overflow): leave it out of the fusion"
                    )
                logits = logits.double().cpu()
                log_probabilities = F.log_softmax(logits, dim=1)
                entropy[k] -= (log_probabilities.exp() * log_probabilities).sum()
                squares[k] += logits.square().mean(1).sum()
                if labels is not None:
                    labels_cpu = labels.cpu()
                    loss[k] -= log_probabilities.gather(1, labels_cpu[:, None]).sum()
                    true = log_probabilities.gather(1, labels_cpu[:, None]).squeeze(1).exp()
                    probability[k].index_add_(0, labels_cpu, true)
    labelled = bool(counts.sum() > 0)
    return ParentScores(
        loss=loss / samples if labelled else torch.full((parents_count,), float("nan"), dtype=torch.float64),
        true_class_probability=torch.where(counts > 0, probability / counts.clamp_min(1), float("nan")),
        class_counts=counts,
        entropy=entropy / samples,
        logit_scale=(squares / samples).sqrt(),
    )
