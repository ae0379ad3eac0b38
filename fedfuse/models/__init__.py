"""A small model zoo for tests, simulations and first steps.

Every model is a flat `nn.Sequential` of Linear, Conv2d, BatchNorm (directly after the layer it
normalises), pointwise activations, pooling, Flatten and Dropout: the fusion engine finds its
levels automatically.
"""

from fedfuse.models.factory import MODEL_NAMES, build_model
from fedfuse.models.lenet import LeNet
from fedfuse.models.mlp import MLP

__all__ = ["MLP", "MODEL_NAMES", "LeNet", "build_model"]
