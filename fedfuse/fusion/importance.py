"""Neuron importance scores: how much each parent neuron matters to its parent's prediction.

A neuron's score is the mean over calibration samples (and positions, for a convolution or tokens) of the
absolute attribution of the classifier's target logit to that neuron, plus 1e-8 so that no neuron has
weight zero, as in the paper. Attributions come from captum; the target is the calibration label, or the
parent's own prediction when the calibration set has no labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fedfuse.fusion.calibration import CalibrationSet
from fedfuse.fusion.statistics import rows_of

EPSILON = 1e-8

#: Methods that score many places from one backward pass (captum's layer list), so a fusion measures every
#: place of a parent at once: gradient × activation. Conductance and DeepLift take one layer at a time.
ONE_PASS_FOR_MANY = ("gradient_x_activation",)


def importance_scores(
    method: str,
    forward: nn.Module,
    modules: Sequence[nn.Module],
    axes: Sequence[int],
    widths: Sequence[int],
    calibration: CalibrationSet,
    dtype: torch.dtype,
    conductance_steps: int,
) -> list[Tensor]:
    """Scores of one parent's neurons at several places: one ``[n_i]`` float64 positive tensor per module.

    Methods in `ONE_PASS_FOR_MANY` score several modules from one backward pass per batch (captum's
    layer list); the others take one module.

    Args:
        method: ``"uniform"``, ``"gradient_x_activation"``, ``"conductance"`` or ``"deeplift"``.
        forward: the parent model (an eval-mode private copy, or a traced copy of it: captum adds hooks).
        modules: modules of ``forward`` whose outputs hold the neurons.
        axes: for each module, the output's axis that holds the neurons.
        widths: for each module, the neurons.
        conductance_steps: integration steps for conductance.
    """
    if method == "uniform":
        return [torch.ones(width, dtype=torch.float64) for width in widths]
    if method not in ONE_PASS_FOR_MANY and len(modules) > 1:
        raise ValueError(f"importance {method!r} scores one module at a time; {len(modules)} given")
    device = next(forward.parameters()).device
    attribution = _attribution(method, forward, list(modules) if len(modules) > 1 else modules[0])
    totals = [torch.zeros(width, dtype=torch.float64, device=device) for width in widths]
    counts = [0] * len(modules)
    for inputs, labels in calibration.batches(device, dtype):
        target = labels if labels is not None else _predictions(forward, inputs)
        kwargs = (
            {"n_steps": conductance_steps, "internal_batch_size": 2 * len(inputs)}
            if method == "conductance"
            else {}
        )
        attributions = attribution.attribute(inputs, target=target, **kwargs)
        for index, values in enumerate(attributions if len(modules) > 1 else [attributions]):
            per_neuron = rows_of(values.detach().abs(), axes[index])
            totals[index] += per_neuron.double().sum(0)
            counts[index] += per_neuron.shape[0]
    return [(total / count + EPSILON).cpu() for total, count in zip(totals, counts)]


def _attribution(method: str, forward: nn.Module, layer: nn.Module | list[nn.Module]):
    # captum is imported on first use: `import fedfuse` stays light (uniform importance never needs it)
    from captum.attr import LayerConductance, LayerDeepLift, LayerGradientXActivation

    if method == "gradient_x_activation":
        return LayerGradientXActivation(forward, layer)
    assert isinstance(layer, nn.Module)
    if method == "conductance":
        return LayerConductance(forward, layer)
    return LayerDeepLift(forward, layer)


def _predictions(forward: nn.Module, inputs: Tensor) -> Tensor:
    with torch.no_grad():
        logits = forward(inputs)
    if logits.dim() != 2:
        raise ValueError(
            f"attribution importance needs classifier outputs [batch, classes]; the model outputs "
            f"{tuple(logits.shape)}. Use importance='uniform'"
        )
    return logits.argmax(dim=1)
