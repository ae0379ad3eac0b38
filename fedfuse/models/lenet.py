"""A LeNet-like small convolutional network that works from 8x8 digits up to 32x32 images."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from fedfuse.models.mlp import check_positive, check_positive_ints, dense_layers

KERNEL_SIZE = 5
PADDING = 2  # "same" padding for a 5x5 kernel: a convolution keeps the spatial size, only pooling halves it
POOL = 2


class LeNet(nn.Sequential):
    """[Conv5x5 → (BatchNorm2d) → ReLU → MaxPool2] per channel count → Flatten → MLP head.

    The head is [Linear → (BatchNorm1d) → ReLU] per hidden width, then Linear to the logits. A flat
    `nn.Sequential` of the kinds the fusion engine understands: every Conv2d and Linear is a fusion
    level. Padded convolutions keep the spatial size, so each block only halves it (floor): 8x8
    digits become 2x2 after two blocks, 28x28 become 7x7, 32x32 become 8x8.

    Input: images [N, in_channels, image_size, image_size]. Output: logits [N, num_classes].

    Args:
        in_channels: image channels (1 for greyscale).
        num_classes: output logits.
        image_size: height = width of the input images, in pixels; at least 2^len(channels).
        channels: output channels of the convolution blocks, input side first.
        hidden: widths of the hidden Linear layers of the head.
        batch_norm: put a BatchNorm directly after every convolution and hidden Linear.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        channels: Sequence[int] = (6, 16),
        hidden: Sequence[int] = (120, 84),
        batch_norm: bool = False,
    ) -> None:
        check_positive_ints("LeNet", in_channels=in_channels, num_classes=num_classes, image_size=image_size)
        if not channels:
            raise ValueError("LeNet needs at least one convolution block; channels is empty")
        for width in channels:
            check_positive("LeNet", "channel count", width)
        side = image_size // POOL ** len(channels)
        if side < 1:
            raise ValueError(
                f"LeNet image_size {image_size} is too small for {len(channels)} pooling blocks: "
                f"it needs at least {POOL ** len(channels)} pixels"
            )
        layers: list[nn.Module] = []
        width_in = in_channels
        for width in channels:
            layers.append(nn.Conv2d(width_in, width, KERNEL_SIZE, padding=PADDING))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers += [nn.ReLU(), nn.MaxPool2d(POOL)]
            width_in = width
        layers.append(nn.Flatten())
        layers += dense_layers(channels[-1] * side * side, hidden, num_classes, batch_norm)
        super().__init__(*layers)
