"""Parametrized layers (``torch.nn.utils.parametrizations.weight_norm``, ``spectral_norm``, or a user's own
``register_parametrization``; and the older hook-based ``torch.nn.utils.weight_norm``, which locuslab's
TCN uses): fused as the plain layers they compute, then written back through their parametrizations.

A parametrized layer's ``weight`` is computed from other parameters at every access, so writing a fitted
weight into it in place would change nothing. The parents are fused as plain copies (each parametrized
tensor replaced by the value it computes), and the fused tensors are assigned to a parametrized copy,
which stores them through the parametrization's ``right_inverse``. A parametrization that cannot hold the
fused value (a spectral norm, which rescales whatever it is given to spectral norm 1) is refused by name.

The older API recomputes ``weight`` from ``weight_g`` and ``weight_v`` in a forward pre-hook (a
``WeightNorm``), so a fused weight written into ``weight`` was overwritten at the next forward: the fused
layer silently stayed one parent's. Its layers are made plain the same way, and the fused weight w is
stored back as ``weight_v = w`` and ``weight_g = ‖w‖`` (per output), which computes w. Its spectral norm
(``SpectralNorm``) is refused by name, and a model just trained, whose computed ``weight`` still hangs in
the autograd graph (which ``copy.deepcopy`` refuses), is copied with that tensor detached (`copied`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm


def parametrized_tensors(model: nn.Module) -> list[tuple[str, str]]:
    """``(module name, tensor name)`` of every parametrized tensor of ``model``."""
    return [
        (name, tensor)
        for name, module in model.named_modules()
        if parametrize.is_parametrized(module)
        for tensor in module.parametrizations  # type: ignore[union-attr]
    ]


def weight_norm_hooks(model: nn.Module) -> list[tuple[str, WeightNorm]]:
    """``(module name, hook)`` of every hook-based weight norm in ``model`` (``nn.utils.weight_norm``)."""
    return [
        (name, hook)
        for name, module in model.named_modules()
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, WeightNorm)
    ]


def copied(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``. The weight a hook-based weight norm computed in a forward with gradients
    is not a leaf, and ``copy.deepcopy`` refuses it: the copy gets it detached (the next forward recomputes
    it anyway); ``model`` is left as it is."""
    memo: dict[int, object] = {}
    for name, hook in weight_norm_hooks(model):
        computed = getattr(model.get_submodule(name), hook.name, None)
        if isinstance(computed, torch.Tensor) and not computed.is_leaf:
            memo[id(computed)] = computed.detach().clone()
    return copy.deepcopy(model, memo)


def has_parametrizations(model: nn.Module) -> bool:
    """Whether ``model`` has a parametrized tensor or a hook-based weight norm."""
    return bool(parametrized_tensors(model) or weight_norm_hooks(model))


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
    for name, hook in weight_norm_hooks(model):
        module = model.get_submodule(name)
        with torch.no_grad():
            value = hook.compute_weight(module).detach().clone()
        for key, registered in list(module._forward_pre_hooks.items()):
            if registered is hook:
                del module._forward_pre_hooks[key]
        del module._parameters[f"{hook.name}_g"], module._parameters[f"{hook.name}_v"]
        delattr(module, hook.name)
        module.register_parameter(hook.name, nn.Parameter(value))
    return model


def check_parametrizations(model: nn.Module, width_multiplier: float = 1.0) -> None:
    """Refuse, before any work, a parametrization that could not hold a fused tensor: each is given its
    own value scaled by 1.5 (on a copy), which a weight norm holds and a spectral norm does not; and
    a fused model of another width, whose tensors no parametrization of the parents' shapes holds.

    Raises:
        ValueError: naming the module and its parametrization.
    """
    for name, module in model.named_modules():
        if any(isinstance(hook, SpectralNorm) for hook in module._forward_pre_hooks.values()):
            raise ValueError(
                f"module '{name}' has a spectral norm (torch.nn.utils.spectral_norm), which rescales any "
                "fused weight to spectral norm 1; remove it before fusing "
                "(torch.nn.utils.remove_spectral_norm)"
            )
    tensors = parametrized_tensors(model) + [(name, hook.name) for name, hook in weight_norm_hooks(model)]
    if not tensors:
        return
    if width_multiplier != 1:
        name, tensor = tensors[0]
        raise ValueError(
            f"width_multiplier={width_multiplier:g} would change the shape of '{name}.{tensor}', which a "
            "parametrization computes; remove the parametrizations before fusing to another width"
        )
    probe = copied(model)
    with torch.no_grad():
        for name, tensor in parametrized_tensors(probe):
            module = probe.get_submodule(name)
            _assign(name, module, tensor, 1.5 * getattr(module, tensor).detach())


def with_parametrizations(fused: nn.Module, template: nn.Module) -> nn.Module:
    """A copy of ``template`` (a parent, parametrized) holding the plain ``fused`` model's values.

    Raises:
        ValueError: naming the module whose parametrization cannot hold its fused tensor.
    """
    result = copied(template)
    values = dict(fused.named_parameters()) | dict(fused.named_buffers())
    with torch.no_grad():
        for key, target in (*result.named_parameters(), *result.named_buffers()):
            if key in values and ".parametrizations." not in key:
                target.copy_(values[key])
        for name, tensor in parametrized_tensors(result):
            value = values[f"{name}.{tensor}".lstrip(".")].detach().clone()  # a Parameter would replace it
            _assign(name, result.get_submodule(name), tensor, value)
        for name, hook in weight_norm_hooks(result):
            module, value = result.get_submodule(name), values[f"{name}.{hook.name}".lstrip(".")]
            getattr(module, f"{hook.name}_v").copy_(value)
            getattr(module, f"{hook.name}_g").copy_(torch.norm_except_dim(value, 2, hook.dim))
            setattr(module, hook.name, hook.compute_weight(module))
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
