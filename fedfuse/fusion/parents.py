"""Checks on the parent models, and their weights, done before any work so bad input changes nothing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn


def check_parents(models: Sequence[nn.Module]) -> None:
    """Every parent must share parent 0's architecture, state_dict keys, shapes and dtypes, and be finite.

    Raises:
        TypeError: a parent is not an ``nn.Module``.
        ValueError: naming the parent's index and the parameter or module that differs, or that holds
            NaN or Inf.
    """
    if len(models) == 0:
        raise ValueError("fuse needs at least one model")
    for index, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise TypeError(f"parent {index} is a {type(model).__name__}, not an nn.Module")
        meta = next((name for name, value in model.state_dict().items() if value.is_meta), None)
        if meta is not None:
            raise ValueError(
                f"parent {index}'s '{meta}' is on the meta device (a shape without values); load or "
                "materialise its weights before fusing"
            )
    reference = models[0].state_dict()
    reference_modules = [(name, type(m), m.extra_repr()) for name, m in models[0].named_modules()]
    for index, model in enumerate(models):
        state = model.state_dict()
        if index > 0:
            _check_same_state(index, reference, state)
            _check_same_modules(index, reference_modules, model)
        for key, value in state.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"parent {index} has NaN or Inf values in '{key}'")


def _check_same_state(index: int, reference: dict[str, Tensor], state: dict[str, Tensor]) -> None:
    missing = [key for key in reference if key not in state]
    if missing:
        raise ValueError(f"parent {index} lacks parameter '{missing[0]}' that parent 0 has")
    extra = [key for key in state if key not in reference]
    if extra:
        raise ValueError(f"parent {index} has parameter '{extra[0]}' that parent 0 lacks")
    for key, value in state.items():
        if value.shape != reference[key].shape:
            raise ValueError(
                f"parent {index}'s '{key}' has shape {tuple(value.shape)}; "
                f"parent 0's has {tuple(reference[key].shape)}"
            )
        if value.dtype != reference[key].dtype:
            raise ValueError(
                f"parent {index}'s '{key}' is {value.dtype}; parent 0's is {reference[key].dtype}"
            )


def _check_same_modules(index: int, reference: list[tuple[str, type, str]], model: nn.Module) -> None:
    modules = [(name, type(m), m.extra_repr()) for name, m in model.named_modules()]
    for ours, theirs in zip(modules, reference):
        if ours != theirs:
            (name, kind, details), (_, reference_kind, reference_details) = ours, theirs
            raise ValueError(
                f"parent {index}'s architecture differs from parent 0's at module '{name or '(root)'}': "
                f"{kind.__name__}({details}) vs {reference_kind.__name__}({reference_details})"
            )
    if len(modules) != len(reference):
        raise ValueError(f"parent {index} has {len(modules)} modules; parent 0 has {len(reference)}")


@dataclass(frozen=True)
class ParentWeights:
    """How much each parent counts.

    Attributes:
        parents: ``[K]`` per-parent weights with mean 1; they multiply the importance scores of the
            parent's neurons in every hidden level.
        classes: ``[K, C]`` per-class shares of each parent in the output layer; each column sums to 1.
    """

    parents: Tensor
    classes: Tensor


def resolve_weights(weights: object, num_parents: int, num_classes: int) -> ParentWeights:
    """Turn the user's ``weights`` into per-parent and per-class shares.

    Args:
        weights: ``None`` (all parents equal); a length-K sequence of positive per-parent weights, such
            as the clients' example counts; or a ``[K, C]`` array of non-negative per-parent, per-class
            weights, such as each client's label counts (the row sums then weight the parents, and each
            column weights that class's output neuron; a class no parent holds falls back to the row sums).

    Raises:
        ValueError: wrong shape, a negative or non-finite value, or a parent of weight 0.
    """
    if weights is None:
        uniform = torch.full((num_parents,), 1.0, dtype=torch.float64)
        return ParentWeights(
            uniform, torch.full((num_parents, num_classes), 1.0 / num_parents, dtype=torch.float64)
        )
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
    return ParentWeights(per_parent / per_parent.mean(), classes)
