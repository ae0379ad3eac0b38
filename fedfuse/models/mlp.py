"""A multi-layer perceptron that takes images (it flattens them first)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


class MLP(nn.Sequential):
    """Flatten → [Linear → (BatchNorm1d) → ReLU → (Dropout)] per hidden width → Linear.

    A flat `nn.Sequential` of the kinds the fusion engine understands, so that each Linear is one
    fusion level. Input: any tensor [N, *] with ``in_features`` values per sample (an image
    [N, C, H, W] with C·H·W = ``in_features``). Output: logits [N, num_classes].

    Args:
        in_features: values per sample after flattening (C·H·W for images).
        num_classes: output logits.
        hidden: widths of the hidden layers, input side first; empty for a linear model.
        batch_norm: put a BatchNorm1d directly after each hidden Linear.
        dropout: dropout probability after each hidden activation; 0 leaves Dropout out.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (128, 64),
        batch_norm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        check_positive_ints("MLP", in_features=in_features, num_classes=num_classes)
        check_dropout("MLP", dropout)
        super().__init__(nn.Flatten(), *dense_layers(in_features, hidden, num_classes, batch_norm, dropout))


def dense_layers(
    in_features: int, hidden: Sequence[int], num_classes: int, batch_norm: bool = False, dropout: float = 0.0
) -> list[nn.Module]:
    """[Linear → (BatchNorm1d) → ReLU → (Dropout)] per hidden width, then Linear to the logits: the MLP,
    and LeNet's head."""
    layers: list[nn.Module] = []
    width_in = in_features
    for width in hidden:
        check_positive("dense", "hidden width", width)
        layers.append(nn.Linear(width_in, width))
        if batch_norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(nn.ReLU())
        if dropout > 0.0:
            layers.append(nn.Dropout(dropout))
        width_in = width
    layers.append(nn.Linear(width_in, num_classes))
    return layers


def check_positive(owner: str, name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner} {name} must be a positive int, got {value!r}")


def check_positive_ints(owner: str, **values: int) -> None:
    """`check_positive` for each keyword (its name is the argument's name in the message)."""
    for name, value in values.items():
        check_positive(owner, name, value)


def check_dropout(owner: str, dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{owner} dropout must be in [0, 1), got {dropout}")
