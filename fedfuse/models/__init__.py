"""A small model zoo for tests, simulations and first steps.

`MLP`, `LeNet` and `VGG11` are flat `nn.Sequential` chains of Linear, Conv2d, BatchNorm (directly
after the layer it normalises), pointwise activations, pooling, Flatten and Dropout. `ResNet` and
`ViT` are custom modules with residual streams. The fusion engine finds the levels of every one of
them by tracing (`fedfuse.describe_levels`); none declares them.
"""

from fedfuse.models.factory import MODEL_NAMES, build_model
from fedfuse.models.lenet import LeNet
from fedfuse.models.mlp import MLP
from fedfuse.models.resnet import BasicBlock, ResNet
from fedfuse.models.vgg import VGG11
from fedfuse.models.vit import TransformerBlock, ViT

__all__ = [
    "MLP",
    "MODEL_NAMES",
    "VGG11",
    "BasicBlock",
    "LeNet",
    "ResNet",
    "TransformerBlock",
    "ViT",
    "build_model",
]
