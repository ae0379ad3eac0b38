"""Cutting a model into levels: the units that fusion groups and fits one after another.

A level is one Linear or Conv2d layer, together with the BatchNorm right after it when there is one
(BatchNorm in eval mode is an affine map, so it is folded into the layer for fitting). A level's
neurons are its output features or channels; a neuron's value is the level's pre-activation output.
Everything between two levels (activations, pooling, Flatten, Dropout) holds no parameters and is
applied unchanged by the fused model to its own level outputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import Tensor, nn

LAYERS = (nn.Linear, nn.Conv2d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class Level:
    """One level of a sequential model.

    Attributes:
        name: qualified name of the Linear/Conv2d layer (its state_dict prefix).
        norm: qualified name of the BatchNorm folded into it, if any.
        start: position of the layer among the model's leaf modules.
        stop: position just after the level (after its BatchNorm).
        kind: ``"linear"`` or ``"conv2d"``.
        width: output neurons (``out_features`` or ``out_channels``).
    """

    name: str
    norm: str | None
    start: int
    stop: int
    kind: str
    width: int


class Leaves(list):
    """A sequential model's leaf modules in execution order, as ``(qualified name, module)`` pairs."""

    def run(self, x: Tensor, start: int, stop: int) -> Tensor:
        """Apply leaves ``start..stop-1`` to ``x``: the model's computation between two positions."""
        for _, module in self[start:stop]:
            x = module(x)
        return x

    def module(self, name: str) -> nn.Module:
        for leaf_name, module in self:
            if leaf_name == name:
                return module
        raise KeyError(name)


def leaves_of(model: nn.Module) -> Leaves:
    """Flatten nested ``nn.Sequential`` containers into the chain of modules they run.

    Raises:
        TypeError: ``model`` is not an ``nn.Sequential``.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            f"the linear variant fuses nn.Sequential models (nested ones too); got {type(model).__name__}. "
            "Wrap the model's layers in nn.Sequential."
        )
    return Leaves(_walk(model, prefix=""))


def _walk(container: nn.Sequential, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    # Not named_children(): it skips a module's repeated appearances, which the forward pass does run.
    for child_name, child in container._modules.items():
        if child is None:
            continue
        name = f"{prefix}{child_name}"
        if isinstance(child, nn.Sequential):
            yield from _walk(child, prefix=f"{name}.")
        else:
            yield name, child


def find_levels(model: nn.Module) -> tuple[Leaves, list[Level]]:
    """The model's leaves and its levels, checked for what the linear variant can fuse.

    Raises:
        TypeError: ``model`` is not an ``nn.Sequential``.
        ValueError: a module the variant cannot fuse, named: one with parameters that is not a
            Linear/Conv2d/BatchNorm, a grouped convolution, a BatchNorm that does not directly follow
            a layer or keeps no running statistics, a module used twice, or no layer at all.
    """
    leaves = leaves_of(model)
    levels: list[Level] = []
    seen: dict[int, str] = {}
    for position, (name, module) in enumerate(leaves):
        if id(module) in seen:
            raise ValueError(
                f"module '{name}' is the same object as '{seen[id(module)]}'; "
                "fusion needs a separate module at every position"
            )
        seen[id(module)] = name
        if isinstance(module, LAYERS):
            levels.append(_layer_level(name, module, position))
        elif isinstance(module, NORMS):
            previous = levels[-1] if levels else None
            if previous is None or previous.stop != position or previous.norm is not None:
                raise ValueError(
                    f"BatchNorm '{name}' does not directly follow a Linear/Conv2d layer, so it cannot be "
                    "folded into one"
                )
            _check_norm(name, module, previous)
            levels[-1] = Level(
                previous.name, name, previous.start, position + 1, previous.kind, previous.width
            )
        elif any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            raise ValueError(
                f"module '{name}' ({type(module).__name__}) holds parameters or buffers; the linear variant "
                "fuses Linear, Conv2d and BatchNorm layers joined by parameter-free modules"
            )
    if not levels:
        raise ValueError("the model has no Linear or Conv2d layer to fuse")
    return leaves, levels


def _layer_level(name: str, module: nn.Module, position: int) -> Level:
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"Conv2d '{name}' has groups={module.groups}; only groups=1 is supported")
        return Level(name, None, position, position + 1, "conv2d", module.out_channels)
    return Level(name, None, position, position + 1, "linear", module.out_features)


def _check_norm(name: str, norm: nn.Module, level: Level) -> None:
    if norm.num_features != level.width:
        raise ValueError(
            f"BatchNorm '{name}' has {norm.num_features} features; '{level.name}' outputs {level.width}"
        )
    if not norm.track_running_stats:
        raise ValueError(
            f"BatchNorm '{name}' keeps no running statistics, so in eval mode it depends on the batch and "
            "is not an affine map that can be folded"
        )
    expected = "linear" if isinstance(norm, nn.BatchNorm1d) else "conv2d"
    if expected != level.kind:
        raise ValueError(
            f"BatchNorm '{name}' ({type(norm).__name__}) follows a {level.kind} layer '{level.name}'"
        )
