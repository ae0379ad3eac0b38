"""Checks on the parent models, done before any work so bad input changes nothing."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrize import type_before_parametrizations


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
    reference_modules = _modules(models[0])
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
    modules = _modules(model)
    for ours, theirs in zip(modules, reference):
        if ours != theirs:
            (name, kind, details), (_, reference_kind, reference_details) = ours, theirs
            raise ValueError(
                f"parent {index}'s architecture differs from parent 0's at module '{name or '(root)'}': "
                f"{kind.__name__}({details}) vs {reference_kind.__name__}({reference_details})"
            )
    if len(modules) != len(reference):
        raise ValueError(f"parent {index} has {len(modules)} modules; parent 0 has {len(reference)}")


def _modules(model: nn.Module) -> list[tuple[str, type, str]]:
    """Each module's name, class and settings. A parametrized module (``weight_norm``) counts by the class
    it had before: torch makes a new class for every module it parametrizes."""
    return [(name, type_before_parametrizations(m), m.extra_repr()) for name, m in model.named_modules()]
