"""Levels that a model declares: the override of tracing, for models that cannot be traced.

Fusion finds a model's levels by tracing it (`fedfuse.fusion.levels`). A model whose forward cannot be
traced (Python control flow on tensor values), or whose author wants other levels, tells fusion where
its levels are by naming the modules whose outputs are level boundaries, either through a method
``fusion_levels()`` or the ``levels=`` argument of `fuse`. Declared levels are read with hooks on the
declared modules, so the model need not be traceable; a declared Linear/Conv (or an
``nn.Sequential(layer, BatchNorm)``) is fitted in closed form by the linear variant, anything else by
the gradient variant. Each declared module must take the previous level's output as its
only input, run once per forward pass, in the declared order, and every parameter of the model must
belong to exactly one declared module, so that fitting the levels one after another fits the whole
model. A level's neurons are the channels of its output: dimension 1 of a 4-D output ``[B, C, H, W]``,
the last dimension otherwise (``[B, D]``, or ``[B, T, D]`` for tokens).

Residual streams: blocks that add their output into a residual stream (``x + f(x)``) cannot group their
output freely, since the identity path carries the stream's channels in the stream's order. Such a block
names, as ``stream``, the level that defines the stream (the stem, a block with a projection shortcut,
a transformer's embedding): it is fitted to targets grouped by that level's grouping, so every block of
the stream agrees on what each fused channel is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LevelSpec:
    """One declared level.

    Attributes:
        module: qualified name of the module whose output holds the level's neurons
            (as in ``model.named_modules()``).
        stream: for a block that adds into a residual stream: the ``module`` of the level that defines
            the stream, whose grouping this level shares. None: the level groups its own neurons.
    """

    module: str
    stream: str | None = None


def declared_levels(model: nn.Module, levels: Sequence[LevelSpec | str] | None) -> list[LevelSpec] | None:
    """The levels declared for ``model`` (by ``levels``, else its ``fusion_levels()``), checked; None when
    neither declares any (fusion then finds the levels of an ``nn.Sequential`` itself).

    Raises:
        ValueError: naming the problem: an unknown module, a module declared twice or nested in another
            declared module, a ``stream`` that names no earlier level, or a parameter that belongs to no
            declared module.
    """
    if levels is None:
        declare = getattr(model, "fusion_levels", None)
        if declare is None:
            return None
        levels = declare()
    specs = [LevelSpec(level) if isinstance(level, str) else level for level in levels]
    if not specs:
        raise ValueError("the level declaration is empty")
    modules = dict(model.named_modules())
    seen: list[str] = []
    for spec in specs:
        if not isinstance(spec, LevelSpec):
            raise TypeError(f"a level is a LevelSpec or a module name, got {type(spec).__name__}")
        if spec.module not in modules:
            raise ValueError(f"declared level '{spec.module}' is not a module of {type(model).__name__}")
        for earlier in seen:
            if (
                spec.module == earlier
                or spec.module.startswith(earlier + ".")
                or earlier.startswith(spec.module + ".")
            ):
                raise ValueError(f"declared levels '{earlier}' and '{spec.module}' overlap")
        if spec.stream is not None and spec.stream not in seen:
            raise ValueError(
                f"level '{spec.module}' shares the stream of '{spec.stream}', "
                "which is not a level declared before it"
            )
        seen.append(spec.module)
    for name, _ in model.named_parameters():
        if not any(name.startswith(level + ".") for level in seen):
            raise ValueError(f"parameter '{name}' belongs to no declared level, so fusion would never fit it")
    return specs
