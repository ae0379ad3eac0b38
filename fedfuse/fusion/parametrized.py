"""Parametrized layers (``torch.nn.utils.parametrizations.weight_norm``, ``spectral_norm``, or a user's own
``register_parametrization``): fused as the plain layers they compute, then written back through their
parametrizations.

A parametrized layer's ``weight`` is computed from other parameters at every access, so writing a fitted
weight into it in place would change nothing. The parents are fused as plain copies (each parametrized
tensor replaced by the value it computes), and the fused tensors are assigned to a parametrized copy,
which stores them through the parametrization's ``right_inverse``. A parametrization that cannot hold the
fused value (a spectral norm, which rescales whatever it is given to spectral norm 1) is refused by name.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize


def parametrized_tensors(model: nn.Module) -> list[tuple[str, str]]:
    """``(module name, tensor name)`` of every parametrized tensor of ``model``."""
    return [
        (name, tensor)
        for name, module in model.named_modules()
        if parametrize.is_parametrized(module)
        for tensor in module.parametrizations  # type: ignore[union-attr]
    ]


def without_parametrizations(model: nn.Module) -> nn.Module:
    """``model`` (changed in place) with each parametrized tensor a plain parameter holding its value.

    Not `torch.nn.utils.parametrize.remove_parametrizations`: that deletes the tensor's property from the
    module's class, which a deep copy shares with the model it was copied from (the caller's parent)."""
    for name in dict.fromkeys(name for name, _ in parametrized_tensors(model)):
        module = model.get_submodule(name)
        with torch.no_grad():
            values = {tensor: getattr(module, tensor).detach().clone() for tensor in module.parametrizations}
        module.__class__ = parametrize.type_before_parametrizations(module)
        del module.parametrizations
        for tensor, value in values.items():
            module.register_parameter(tensor, nn.Parameter(value))
    return model


def check_parametrizations(model: nn.Module, width_multiplier: float = 1.0) -> None:
    """Refuse, before any work, a parametrization that could not hold a fused tensor: each is given its
    own value scaled by 1.5 (on a copy), which a weight norm holds and a spectral norm does not; and
    a fused model of another width, whose tensors no parametrization of the parents' shapes holds.

    Raises:
        ValueError: naming the module and its parametrization.
    """
    tensors = parametrized_tensors(model)
    if not tensors:
        return
    if width_multiplier != 1:
        name, tensor = tensors[0]
        raise ValueError(
            f"width_multiplier={width_multiplier:g} would change the shape of '{name}.{tensor}', which a "
            "parametrization computes; remove the parametrizations before fusing to another width"
        )
    probe = copy.deepcopy(model)
    with torch.no_grad():
        for name, tensor in parametrized_tensors(probe):
            module = probe.get_submodule(name)
            _assign(name, module, tensor, 1.5 * getattr(module, tensor).detach())


def with_parametrizations(fused: nn.Module, template: nn.Module) -> nn.Module:
    """A copy of ``template`` (a parent, parametrized) holding the plain ``fused`` model's values.

    Raises:
        ValueError: naming the module whose parametrization cannot hold its fused tensor.
    """
    result = copy.deepcopy(template)
    values = dict(fused.named_parameters()) | dict(fused.named_buffers())
    with torch.no_grad():
        for key, target in (*result.named_parameters(), *result.named_buffers()):
            if key in values and ".parametrizations." not in key:
                target.copy_(values[key])
        for name, tensor in parametrized_tensors(result):
            value = values[f"{name}.{tensor}".lstrip(".")].detach().clone()  # a Parameter would replace it
            _assign(name, result.get_submodule(name), tensor, value)
    return result


def _assign(name: str, module: nn.Module, tensor: str, value: torch.Tensor) -> None:
    """Store ``value`` through the parametrization (its ``right_inverse``), and check it is held."""
    setattr(module, tensor, value)
    held = getattr(module, tensor)
    if not torch.allclose(held, value, rtol=1e-4, atol=1e-5 * float(value.abs().max()) + 1e-12):
        kinds = ", ".join(type(p).__name__ for p in module.parametrizations[tensor])
        raise ValueError(
            f"module '{name}': its parametrization of '{tensor}' ({kinds}) cannot hold a fused value (it "
            f"gives back a tensor {float((held - value).norm() / value.norm()):.2g} away, relatively); "
            "remove it before fusing (torch.nn.utils.parametrize.remove_parametrizations)"
        )
