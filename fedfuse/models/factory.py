"""Build a zoo model by name, so that simulations and the Flower app choose models by an option."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedfuse.models.lenet import LeNet
from fedfuse.models.mlp import MLP
from fedfuse.models.names import MODEL_NAMES
from fedfuse.models.resnet import ResNet
from fedfuse.models.vgg import VGG11
from fedfuse.models.vit import ViT


def build_model(
    name: str,
    *,
    in_channels: int,
    image_size: int,
    num_classes: int,
    seed: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A fresh zoo model for images [N, in_channels, image_size, image_size] and num_classes logits.

    Args:
        name: ``"mlp"`` (`MLP` on the flattened image), ``"cnn"`` or ``"lenet"`` (`LeNet`),
            ``"cnn-bn"`` (`LeNet` with BatchNorm), ``"vgg11"`` / ``"vgg11-bn"`` (`VGG11` without /
            with BatchNorm), ``"resnet8"`` / ``"resnet18"`` (`ResNet` of that depth), ``"vit"``
            (`ViT`). The first six are ``nn.Sequential`` chains; ResNet and ViT are custom
            modules with residual streams. Fusion finds the levels of all of them by tracing.
        in_channels, image_size, num_classes: the data's shape and classes.
        seed: seeds the random initial weights (same seed → same weights) without touching the
            global torch RNG; None draws them from the global RNG.
        **kwargs: passed on to the model class (e.g. ``hidden=(256, 128)``, ``width_multiplier=0.25``,
            ``width=32``, ``dim=32``).

    Raises:
        ValueError: an unknown name.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(map(repr, MODEL_NAMES))}")
    if seed is None:
        return _construct(name, in_channels, image_size, num_classes, kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _construct(name, in_channels, image_size, num_classes, kwargs)


def _construct(
    name: str, in_channels: int, image_size: int, num_classes: int, kwargs: dict[str, Any]
) -> nn.Module:
    if name == "mlp":
        return MLP(in_channels * image_size * image_size, num_classes, **kwargs)
    if name.startswith("resnet"):
        return ResNet(int(name.removeprefix("resnet")), in_channels, num_classes, image_size, **kwargs)
    if name == "vit":
        return ViT(in_channels, num_classes, image_size, **kwargs)
    if name.endswith("-bn"):
        kwargs = {"batch_norm": True, **kwargs}
    model = VGG11 if name.startswith("vgg11") else LeNet
    return model(in_channels, num_classes, image_size, **kwargs)
