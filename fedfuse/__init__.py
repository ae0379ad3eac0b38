"""fedfuse: one-shot federated learning by neuron-interpolation model fusion.

Layers, bottom up: `fedfuse.fusion` (the fusion engine, pure PyTorch), `fedfuse.models` (a small model
zoo), `fedfuse.strategy` (the Flower strategy; needs the ``flower`` extra). Every name is
imported on first use, so the engine works without Flower installed and a light import stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedfuse.fusion import (
        FusionConfig,
        FusionReport,
        FusionResult,
        LevelPlan,
        LevelReport,
        LevelSpec,
        describe_levels,
        fuse,
    )
    from fedfuse.strategy import FedFuse

__all__ = [
    "FedFuse",
    "FusionConfig",
    "FusionReport",
    "FusionResult",
    "LevelPlan",
    "LevelReport",
    "LevelSpec",
    "describe_levels",
    "fuse",
]
#: Where each public name lives; loaded on first use (PEP 562): ``import fedfuse`` costs nothing, the
#: engine loads PyTorch when first asked for, and ``FedFuse`` loads Flower.
_SOURCES = {name: "fedfuse.strategy" if name == "FedFuse" else "fedfuse.fusion" for name in __all__}
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _SOURCES:
        return getattr(importlib.import_module(_SOURCES[name]), name)
    raise AttributeError(f"module 'fedfuse' has no attribute {name!r}")
