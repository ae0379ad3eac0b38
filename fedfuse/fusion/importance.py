"""Neuron importance scores: how much each parent neuron matters to its parent's prediction.

A neuron's score is the mean over calibration samples (and positions, for a convolution or tokens) of the
absolute attribution of the classifier's target logit to that neuron, plus 1e-8 so that no neuron has
weight zero, as in the paper. Attributions come from captum; the target is the calibration label, or the
parent's own prediction when the calibration set has no labels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedfuse.fusion.calibration import CalibrationSet
from fedfuse.fusion.statistics import rows_of

EPSILON = 1e-8


def importance_scores(
    method: str,
    forward: nn.Module,
    module: nn.Module,
    axis: int,
    width: int,
    calibration: CalibrationSet,
    dtype: torch.dtype,
    conductance_steps: int,
) -> Tensor:
    """Scores of one parent's neurons at one place: ``[n]``, float64, positive.

    Args:
        method: ``"uniform"``, ``"gradient_x_activation"``, ``"conductance"`` or ``"deeplift"``.
        forward: the parent model (an eval-mode private copy, or a traced copy of it: captum adds hooks).
        module: a module of ``forward`` whose output holds the neurons.
        axis: the output's axis that holds the neurons.
        width: the neurons.
        conductance_steps: integration steps for conductance.
    """
    if method == "uniform":
        return torch.ones(width, dtype=torch.float64)
    device = next(forward.parameters()).device
    attribution = _attribution(method, forward, module)
    total = torch.zeros(width, dtype=torch.float64, device=device)
    count = 0
    for inputs, labels in calibration.batches(device, dtype):
        target = labels if labels is not None else _predictions(forward, inputs)
        kwargs = (
            {"n_steps": conductance_steps, "internal_batch_size": 2 * len(inputs)}
            if method == "conductance"
            else {}
        )
        attributions = attribution.attribute(inputs, target=target, **kwargs).detach()
        per_channel = rows_of(attributions.abs(), axis)
        total += per_channel.double().sum(0)
        count += per_channel.shape[0]
    return (total / count + EPSILON).cpu()


def _attribution(method: str, forward: nn.Module, module: nn.Module):
    # captum is imported on first use: `import fedfuse` stays light (uniform importance never needs it)
    from captum.attr import LayerConductance, LayerDeepLift, LayerGradientXActivation

    if method == "gradient_x_activation":
        return LayerGradientXActivation(forward, module)
    if method == "conductance":
        return LayerConductance(forward, module)
    return LayerDeepLift(forward, module)


def _predictions(forward: nn.Module, inputs: Tensor) -> Tensor:
    with torch.no_grad():
        logits = forward(inputs)
    if logits.dim() != 2:
        raise ValueError(
            f"attribution importance needs classifier outputs [batch, classes]; the model outputs "
            f"{tuple(logits.shape)}. Use importance='uniform'"
        )
    return logits.argmax(dim=1)
