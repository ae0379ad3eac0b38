"""Neuron importance scores: how much each parent neuron matters to its parent's prediction.

A neuron's score is the mean over calibration samples (and output positions, for a convolution) of the
absolute attribution of the classifier's target logit to that neuron, plus 1e-8 so that no neuron has
weight zero, as in the paper. Attributions come from captum; the target is the calibration label, or the
parent's own prediction when the calibration set has no labels.
"""

from __future__ import annotations

import torch
from captum.attr import LayerConductance, LayerDeepLift, LayerGradientXActivation
from torch import Tensor, nn

from fedfuse.fusion.calibration import CalibrationSet
from fedfuse.fusion.segments import channels_last

EPSILON = 1e-8


def importance_scores(
    method: str,
    parent: nn.Module,
    scored_module: nn.Module,
    width: int,
    calibration: CalibrationSet,
    dtype: torch.dtype,
    conductance_steps: int,
) -> Tensor:
    """Scores of one parent's neurons at one level: ``[n]``, float64, positive.

    Args:
        method: ``"uniform"``, ``"gradient_x_activation"``, ``"conductance"`` or ``"deeplift"``.
        parent: the parent model, in eval mode (a private copy: captum adds hooks while it works).
        scored_module: the module whose output holds the level's neurons (the folded BatchNorm when
            there is one, else the layer, or the declared level module).
        width: the level's neurons.
        conductance_steps: integration steps for conductance.
    """
    if method == "uniform":
        return torch.ones(width, dtype=torch.float64)
    device = next(parent.parameters()).device
    attribution = _attribution(method, parent, scored_module)
    total = torch.zeros(width, dtype=torch.float64, device=device)
    count = 0
    for inputs, labels in calibration.batches(device, dtype):
        target = labels if labels is not None else _predictions(parent, inputs)
        kwargs = (
            {"n_steps": conductance_steps, "internal_batch_size": 2 * len(inputs)}
            if method == "conductance"
            else {}
        )
        attributions = attribution.attribute(inputs, target=target, **kwargs).detach()
        per_channel = channels_last(attributions.abs())
        total += per_channel.double().sum(0)
        count += per_channel.shape[0]
    return (total / count + EPSILON).cpu()


def _attribution(method: str, parent: nn.Module, module: nn.Module):
    if method == "gradient_x_activation":
        return LayerGradientXActivation(parent, module)
    if method == "conductance":
        return LayerConductance(parent, module)
    return LayerDeepLift(parent, module)


def _predictions(parent: nn.Module, inputs: Tensor) -> Tensor:
    with torch.no_grad():
        logits = parent(inputs)
    if logits.dim() != 2:
        raise ValueError(
            f"attribution importance needs classifier outputs [batch, classes]; the model outputs "
            f"{tuple(logits.shape)}. Use importance='uniform'"
        )
    return logits.argmax(dim=1)
