"""The fusion engine: neuron-interpolation fusion of K PyTorch models. Pure PyTorch: never imports Flower."""

from fedfuse.fusion.config import FusionConfig
from fedfuse.fusion.declared import LevelSpec
from fedfuse.fusion.fuse import FusionResult, check_fusable, fuse
from fedfuse.fusion.levels import LevelPlan, describe_levels
from fedfuse.fusion.report import FusionReport, LevelReport
from fedfuse.fusion.tracing import UntraceableModelError
from fedfuse.fusion.weights import class_weights

__all__ = [
    "FusionConfig",
    "FusionReport",
    "FusionResult",
    "LevelPlan",
    "LevelReport",
    "LevelSpec",
    "UntraceableModelError",
    "check_fusable",
    "class_weights",
    "describe_levels",
    "fuse",
]
