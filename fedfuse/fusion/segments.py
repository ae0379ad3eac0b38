"""Levels as the gradient variant sees them: a run of modules from the level's input to its output.

Either declared by the model (`fedfuse.fusion.declared`), or found in an ``nn.Sequential`` (a Linear or
Conv2d with its BatchNorm). A level's input and output are read off a full forward pass with hooks, so
any architecture whose levels form a chain works, whatever its forward does between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from fedfuse.fusion.declared import LevelSpec, declared_levels
from fedfuse.fusion.levels import find_levels


@dataclass(frozen=True)
class Segment:
    """One level.

    Attributes:
        name: the level's name in reports (its module's qualified name).
        modules: qualified names of the modules that compute the level, in order: the first takes the
            level's input, the last returns its output (its neurons).
        stream: the name of the level whose grouping this one shares (a residual stream), or None.
    """

    name: str
    modules: tuple[str, ...]
    stream: str | None = None


def segments_of(model: nn.Module, levels: Sequence[LevelSpec | str] | None) -> list[Segment]:
    """The model's levels: declared ones (``levels``, else ``model.fusion_levels()``), or else those of
    an ``nn.Sequential``."""
    declared = declared_levels(model, levels)
    if declared is not None:
        return [Segment(spec.module, (spec.module,), spec.stream) for spec in declared]
    leaves, found = find_levels(model)
    return [
        Segment(level.name, tuple(name for name, _ in leaves[level.start : level.stop])) for level in found
    ]


class _Captured(Exception):
    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.value = value


def capture(model: nn.Module, module: nn.Module, inputs: Tensor, *, output: bool) -> Tensor:
    """The input (``output=False``) or output of ``module`` when ``model`` runs on ``inputs``.

    The forward pass stops right there, so the rest of the model costs nothing.
    """

    def on_input(_: nn.Module, args: tuple) -> None:
        raise _Captured(args[0])

    def on_output(_: nn.Module, __: tuple, result: Tensor) -> None:
        raise _Captured(result)

    handle = module.register_forward_hook(on_output) if output else module.register_forward_pre_hook(on_input)
    try:
        model(inputs)
    except _Captured as captured:
        return captured.value
    finally:
        handle.remove()
    raise RuntimeError(f"{type(module).__name__} was never called in the model's forward pass")


def channel_dim(output: Tensor) -> int:
    """Where a level's neurons are: dimension 1 of ``[B, C, H, W]``, the last one otherwise."""
    return 1 if output.dim() == 4 else -1


def channels_last(output: Tensor) -> Tensor:
    """A level's output as ``[rows, neurons]``: one row per sample and position (or token)."""
    return output.movedim(channel_dim(output), -1).reshape(-1, output.shape[channel_dim(output)])
