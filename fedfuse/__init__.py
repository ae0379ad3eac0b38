"""fedfuse: one-shot federated learning by neuron-interpolation model fusion.

Layers, bottom up: `fedfuse.fusion` (the fusion engine, pure PyTorch), `fedfuse.models` (a small model
zoo), `fedfuse.strategy` (the Flower strategy; needs the ``flower`` extra). ``FedFuse`` is imported
lazily so that the engine works without Flower installed.
"""

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
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "FedFuse":
        from fedfuse.strategy import FedFuse

        return FedFuse
    raise AttributeError(f"module 'fedfuse' has no attribute {name!r}")
