"""CIFAR-style residual networks (He et al., 2016): ResNet-8 and ResNet-18."""

from __future__ import annotations

from torch import Tensor, nn

from fedfuse.models.mlp import check_positive_ints

# depth → blocks per stage; stage s has width · 2^s channels and (for s > 0) starts with stride 2.
RESNET_STAGES: dict[int, tuple[int, ...]] = {8: (1, 1, 1), 18: (2, 2, 2, 2)}


class BasicBlock(nn.Module):
    """ReLU(BN(conv3x3(ReLU(BN(conv3x3(x))))) + shortcut(x)).

    The shortcut is the identity when the block keeps the channels and the spatial size, else a
    projection: a strided 1x1 convolution and a BatchNorm. Convolutions have no bias (the
    BatchNorm after each supplies it).

    Input: [N, in_channels, H, W]. Output: [N, out_channels, ceil(H / stride), ceil(W / stride)].
    Fusion traces it into levels: conv1 (with bn1), then conv2 (with bn2) and the projection (with its
    BatchNorm), whose outputs the addition joins into one residual stream.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first convolution (and of the projection).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        check_positive_ints("BasicBlock", in_channels=in_channels, out_channels=out_channels, stride=stride)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    @property
    def projects(self) -> bool:
        """Whether the shortcut is a projection (so the block starts a new residual stream)."""
        return not isinstance(self.shortcut, nn.Identity)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet: stem → residual blocks → head, ``head(blocks(stem(x)))``.

    - ``stem``: Conv3x3 (``width`` channels, no bias) → BatchNorm2d → ReLU.
    - ``blocks``: the `BasicBlock` modules of all stages in one `nn.Sequential` (``blocks.0``,
      ``blocks.1``, ...). Stage s has ``width · 2^s`` channels; every stage but the first starts
      with a stride-2 block. ResNet-8: 3 stages of 1 block (width, 2w, 4w); ResNet-18: 4 stages
      of 2 blocks (width, 2w, 4w, 8w).
    - ``head``: AdaptiveAvgPool2d(1) → Flatten → Linear to the logits.

    Fusion finds its levels by tracing it (every convolution with its BatchNorm, the head's Linear)
    and its residual streams (the stem's channels through the identity blocks, a new stream at each
    projection); see `fedfuse.describe_levels`.

    Any image size works: a stride-2 convolution of a 1x1 map stays 1x1, and the head pools what
    is left (32x32 ends at 8x8 in ResNet-8 and 4x4 in ResNet-18; 8x8 digits at 2x2 and 1x1).

    Input: images [N, in_channels, image_size, image_size]. Output: logits [N, num_classes].

    Args:
        depth: 8 or 18.
        in_channels: image channels (1 for greyscale).
        num_classes: output logits.
        image_size: height = width of the input images, in pixels (validated; the network
            itself adapts to any size).
        width: channels of the stem and the first stage (16: about 78k parameters for ResNet-8,
            0.7M for ResNet-18; 64 is torchvision's ResNet-18 width).

    Raises:
        ValueError: a depth other than 8 or 18, or a non-positive size.
    """

    def __init__(
        self,
        depth: int = 8,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        width: int = 16,
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth not in RESNET_STAGES:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_STAGES)}, got {depth!r}")
        check_positive_ints(
            "ResNet", in_channels=in_channels, num_classes=num_classes, image_size=image_size, width=width
        )
        self.depth = depth
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        blocks: list[BasicBlock] = []
        channels = width
        for stage, count in enumerate(RESNET_STAGES[depth]):
            out_channels = width * 2**stage
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(channels, out_channels, stride))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))
