"""A small model zoo for tests, simulations and first steps.

`MLP`, `LeNet` and `VGG11` are flat `nn.Sequential` chains of Linear, Conv2d, BatchNorm (directly
after the layer it normalises), pointwise activations, pooling, Flatten and Dropout. `ResNet` and
`ViT` are custom modules with residual streams. The fusion engine finds the levels of every one of
them by tracing (`fedfuse.describe_levels`); none declares them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedfuse.models.names import MODEL_NAMES

if TYPE_CHECKING:
    from fedfuse.models.factory import build_model
    from fedfuse.models.lenet import LeNet
    from fedfuse.models.mlp import MLP
    from fedfuse.models.resnet import BasicBlock, ResNet
    from fedfuse.models.vgg import VGG11
    from fedfuse.models.vit import TransformerBlock, ViT

#: Where each model lives; loaded on first use (PEP 562), so `MODEL_NAMES` costs no PyTorch import.
_SOURCES = {
    "build_model": "fedfuse.models.factory",
    "LeNet": "fedfuse.models.lenet",
    "MLP": "fedfuse.models.mlp",
    "BasicBlock": "fedfuse.models.resnet",
    "ResNet": "fedfuse.models.resnet",
    "VGG11": "fedfuse.models.vgg",
    "TransformerBlock": "fedfuse.models.vit",
    "ViT": "fedfuse.models.vit",
}
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


def __getattr__(name: str) -> Any:
    if name in _SOURCES:
        return getattr(importlib.import_module(_SOURCES[name]), name)
    raise AttributeError(f"module 'fedfuse.models' has no attribute {name!r}")
