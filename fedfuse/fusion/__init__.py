"""The fusion engine: neuron-interpolation fusion of K PyTorch models. Pure PyTorch: never imports Flower."""

from fedfuse.fusion.config import FusionConfig
from fedfuse.fusion.fuse import FusionResult, fuse
from fedfuse.fusion.report import FusionReport, LevelReport

__all__ = ["FusionConfig", "FusionReport", "FusionResult", "LevelReport", "fuse"]
