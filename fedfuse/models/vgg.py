"""VGG11 (Simonyan & Zisserman, 2015, configuration "A"), scaled in width and sized for small images."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from fedfuse.models.mlp import check_dropout, check_positive_ints, dense_layers

# Configuration "A": output channels of the 3x3 convolutions, "M" a 2x2 max-pool.
VGG11_CONFIG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
POOL = 2


class VGG11(nn.Sequential):
    """[Conv3x3 (padding 1) → (BatchNorm2d) → ReLU] per configuration entry, MaxPool2 at each "M" →
    Flatten → head [Linear → (BatchNorm1d) → ReLU → (Dropout)] per hidden width → Linear.

    Why a flat `nn.Sequential`: the fusion engine's linear variant cuts a chain into levels by
    itself (each Conv2d or Linear with the BatchNorm directly after it), so VGG11 needs no
    ``fusion_levels()`` declaration; everything between two levels (ReLU, MaxPool2d, Flatten,
    Dropout) holds no parameters.

    Small images: the padded convolutions keep the spatial size and each of the five max-pools
    halves it (floor). A max-pool that would shrink the map below 1x1 is left out, so the network
    takes any image size: 32x32 pools five times down to 1x1; 28x28 pools four times
    (28 → 14 → 7 → 3 → 1) and skips the last; 8x8 digits pool three times (8 → 4 → 2 → 1) and
    skip the last two. The head flattens the final map (``side x side`` per channel, 1x1 for
    images up to 32x32 pixels, larger above).

    Initialisation: He (Kaiming) normal weights for fan-in with ReLU and zero biases, for every
    Conv2d and Linear. PyTorch's default initialisation shrinks the signal through VGG11's ten
    weighted layers: without BatchNorm the network then barely learns (digits at 28x28, width
    0.25, Adam lr 3e-3: 21% test accuracy after 4 epochs, against 95% with He initialisation).

    Input: images [N, in_channels, image_size, image_size]. Output: logits [N, num_classes].

    Args:
        in_channels: image channels (1 for greyscale).
        num_classes: output logits.
        image_size: height = width of the input images, in pixels.
        width_multiplier: scales every convolution's channel count (rounded, at least 1): 1.0 is
            the standard VGG11 (64 ... 512 channels, about 9.2M convolution weights), 0.25 a
            quarter as wide (16 ... 128 channels, about 1/16 of the weights and compute).
        batch_norm: put a BatchNorm directly after every convolution and hidden Linear ("vgg11-bn").
        hidden: widths of the hidden Linear layers of the head; None: one hidden layer as wide as
            the last convolution (512 · width_multiplier); empty: a linear head.
        dropout: dropout probability after each hidden Linear's ReLU; 0 leaves Dropout out.

    Raises:
        ValueError: a non-positive size, a non-positive width_multiplier or hidden width, or a
            dropout outside [0, 1).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        width_multiplier: float = 1.0,
        batch_norm: bool = False,
        hidden: Sequence[int] | None = None,
        dropout: float = 0.0,
    ) -> None:
        check_positive_ints("VGG11", in_channels=in_channels, num_classes=num_classes, image_size=image_size)
        if (
            isinstance(width_multiplier, bool)
            or not isinstance(width_multiplier, (int, float))
            or not width_multiplier > 0  # also refuses NaN
        ):
            raise ValueError(f"VGG11 width_multiplier must be a positive number, got {width_multiplier!r}")
        check_dropout("VGG11", dropout)
        layers: list[nn.Module] = []
        width_in, side = in_channels, image_size
        for entry in VGG11_CONFIG:
            if entry == "M":
                if side // POOL >= 1:
                    layers.append(nn.MaxPool2d(POOL))
                    side //= POOL
                continue
            width = scaled_width(int(entry), width_multiplier)
            layers.append(nn.Conv2d(width_in, width, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU())
            width_in = width
        if hidden is None:
            hidden = (width_in,)
        layers.append(nn.Flatten())
        layers += dense_layers(width_in * side * side, hidden, num_classes, batch_norm, dropout)
        super().__init__(*layers)
        for module in self:
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(module.bias)


def scaled_width(channels: int, multiplier: float) -> int:
    """``channels · multiplier`` rounded to the nearest int, at least 1."""
    return max(1, round(channels * multiplier))
