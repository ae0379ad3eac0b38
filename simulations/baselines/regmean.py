"""RegMean (Jin, Ren, Preotiuc-Pietro & Cheng, "Dataless Knowledge Fusion by Merging Weights of Language
Models", ICLR 2023): every Linear/Conv layer merged in closed form from its inputs' Gram matrices.

For a layer that computes ``x W`` (bias as a column of ones), the merged W minimises
``Σ_i ||X_i W - X_i W_i||²`` over each model's own inputs ``X_i`` to that layer: ``W = (Σ_i G_i)⁻¹ Σ_i G_i
W_i`` with ``G_i = X_iᵀ X_i``. As in the paper, the off-diagonal entries of each ``G_i`` are scaled by
``alpha`` (``alpha = 1`` is the exact least-squares merge; smaller moves toward the plain average), which
keeps the solve well conditioned. A convolution's rows are its input patches (`fedfuse.fusion.statistics.
layer_inputs`, the rows the fusion engine's own statistics use). Everything else (BatchNorm parameters and
running statistics) is averaged uniformly. The Grams are taken on the server's calibration inputs; the
labels are not used.

RegMean aligns no neurons: it is made for models fine-tuned from one shared init, and is expected to fail
like weight averaging on models trained from independent inits.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fedfuse.fusion.levels import plan_levels
from fedfuse.fusion.statistics import layer_inputs
from simulations.baselines.averaging import average_state_dicts

#: The scale of the Grams' off-diagonal entries.
ALPHA = 0.9
#: Added to the summed Gram's diagonal, relative to its mean diagonal entry, so that inputs the
#: calibration set never excites (a dead channel) leave the solve well posed; they keep the average.
RIDGE = 1e-6


def regmean(models: Sequence[nn.Module], x: Tensor, alpha: float = ALPHA, batch_size: int = 256) -> nn.Module:
    """The RegMean merge of ``models`` (uniform average for every parameter outside a Linear/Conv).

    Args:
        models: K >= 1 models of one architecture.
        x: the calibration inputs.
        alpha: the off-diagonal scale of the Grams, in [0, 1].
        batch_size: inputs run at once while the Grams are accumulated.

    Raises:
        ValueError: no models, an alpha outside [0, 1], or a level that is no plain Linear/Conv (named).
    """
    if not models:
        raise ValueError("RegMean needs at least one model")
    if not 0 <= alpha <= 1:
        raise ValueError(f"RegMean's alpha must be in [0, 1], got {alpha}")
    plan = plan_levels(copy.deepcopy(models[0]).eval(), x[:8])
    for level in plan.levels:
        grouped = level.closed_form and getattr(models[0].get_submodule(level.layer), "groups", 1) != 1
        if not level.closed_form or grouped or level.kind == "embedding":
            what = (
                "a grouped convolution"
                if grouped
                else "an embedding"
                if level.kind == "embedding"
                else f"a {level.kind} ({level.reason})"
            )
            raise ValueError(
                f"RegMean merges Linear/Conv layers; {type(models[0]).__name__} has level "
                f"{level.name!r} that is {what}"
            )
    layers = [level.layer for level in plan.levels]
    merged = copy.deepcopy(models[0])
    merged.load_state_dict(average_state_dicts([m.state_dict() for m in models], [1.0] * len(models)))
    gram_sum: dict[str, Tensor] = {}
    product_sum: dict[str, Tensor] = {}
    for model in models:
        for name, gram in input_grams(model, layers, x, batch_size).items():
            gram = alpha * gram + (1 - alpha) * torch.diag(gram.diagonal())
            weights = _weights(model.get_submodule(name))
            gram_sum[name] = gram_sum.get(name, 0) + gram
            product_sum[name] = product_sum.get(name, 0) + gram @ weights
    with torch.no_grad():
        for name in layers:
            gram = gram_sum[name]
            ridge = RIDGE * gram.diagonal().mean().clamp_min(1e-12)
            eye = torch.eye(len(gram), dtype=gram.dtype)
            mean = _weights(merged.get_submodule(name))
            solution = torch.linalg.solve(gram + ridge * eye, product_sum[name] + ridge * mean)
            _load(merged.get_submodule(name), solution)
    return merged.eval()


@torch.no_grad()
def input_grams(model: nn.Module, layers: Sequence[str], x: Tensor, batch_size: int) -> dict[str, Tensor]:
    """Per layer, the float64 Gram ``XᵀX`` of its input rows on ``x`` (a column of ones appended when it
    has a bias), as ``model`` runs in eval mode."""
    grams: dict[str, Tensor] = {}

    def hook(name: str, layer: nn.Module):
        def record(_: nn.Module, args: tuple) -> None:
            rows = layer_inputs(layer, args[0]).flatten(0, -2).double()
            if layer.bias is not None:
                rows = torch.cat([rows, rows.new_ones(len(rows), 1)], dim=1)
            grams[name] = grams.get(name, 0) + rows.T @ rows

        return record

    handles = [
        model.get_submodule(n).register_forward_pre_hook(hook(n, model.get_submodule(n))) for n in layers
    ]
    try:
        model.eval()
        for start in range(0, len(x), batch_size):
            model(x[start : start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    return grams


def _weights(layer: nn.Module) -> Tensor:
    """``[fan_in (+1), n]``: the layer's map in the layout ``rows @ weights``, bias last."""
    weight = layer.weight.detach().double().flatten(1).T
    if layer.bias is None:
        return weight
    return torch.cat([weight, layer.bias.detach().double()[None, :]], dim=0)


def _load(layer: nn.Module, solution: Tensor) -> None:
    if layer.bias is not None:
        layer.bias.copy_(solution[-1])
        solution = solution[:-1]
    layer.weight.copy_(solution.T.reshape(layer.weight.shape))
