"""Models written the way Flower users write them: custom modules with their own forward, not zoo chains."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QuickstartNet(nn.Module):
    """Flower's quickstart-pytorch ``Net``, as written there (for 3x32x32 images): functional ReLU, one
    MaxPool2d module used twice, ``x.view(-1, 16 * 5 * 5)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class MnistExampleNet(nn.Module):
    """PyTorch's own MNIST example (``pytorch/examples``, ``mnist/main.py``), as written there: ``fc1``
    reads 9,216 inputs, more than a calibration set has samples."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


class TutorialNet(nn.Module):
    """The ``Net`` of PyTorch's "Deep Learning with PyTorch: A 60 Minute Blitz", as written there: the
    flattened size counted by a Python loop over ``x.size()[1:]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, self.num_flat_features(x))
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)

    def num_flat_features(self, x: torch.Tensor) -> int:
        size = x.size()[1:]  # all dimensions except the batch dimension
        num_features = 1
        for s in size:
            num_features *= s
        return num_features


class ShapeBranches(nn.Module):
    """A forward that adapts to its input's shape: images with or without their channel axis (counted by
    ``len(x.shape)``), flattened unless already flat."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 24)
        self.fc2 = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x.shape) == 4:
            x = x.squeeze(1)
        if x.shape[-1] != 64:
            x = x.flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


class BatchSizeBranch(nn.Module):
    """A forward that computes something else for a single sample."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(0) > 1:
            x = x - x.mean(0)
        return self.fc(x)


class ValueBranch(nn.Module):
    """A forward whose control flow depends on the data."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean().item() > 0:
            x = x.relu()
        return self.fc(x)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: a 1x1 expansion, a depthwise 3x3 convolution, a linear 1x1 projection, each
    with BatchNorm, and the input added back when the shapes allow."""

    def __init__(self, channels: int, expansion: int, out_channels: int, stride: int) -> None:
        super().__init__()
        hidden = channels * expansion
        self.expand = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
        )
        self.project = nn.Sequential(
            nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.residual = stride == 1 and channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class TinyMobileNet(nn.Module):
    """A MobileNetV2-style network, as people write one for small images on edge clients."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True)
        )
        self.blocks = nn.Sequential(InvertedResidual(8, 2, 12, 2), InvertedResidual(12, 3, 12, 1))
        self.classifier = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


class InceptionNet(nn.Module):
    """Channels concatenated three ways: branches of different kernels side by side (Inception), a layer
    reading its block's input, the model's input included, beside the block's output (DenseNet), and a
    head reading the mean and the maximum of the same channels side by side."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.branch1 = nn.Conv2d(6, 4, 1)
        self.branch3 = nn.Sequential(nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5))
        self.dense = nn.Conv2d(1 + 6 + 4 + 5, 7, 3, padding=1)
        self.head = nn.Linear(2 * 7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = F.relu(self.stem(x))
        mixed = torch.cat([F.relu(self.branch1(stem)), F.relu(self.branch3(stem))], dim=1)
        grown = torch.cat((x, stem, mixed), 1)
        out = F.relu(self.dense(grown))
        return self.head(torch.cat([out.mean((2, 3)), out.amax((2, 3))], dim=1))


class ConcatenatedOutput(nn.Module):
    """A model whose output is two layers' outputs side by side."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(8, 6)
        self.first = nn.Linear(6, 2)
        self.second = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.hidden(x))
        return torch.cat([self.first(h), self.second(h)], dim=1)


class FeatureNet(nn.Module):
    """A forward with optional arguments, as research code has them: features on request, a mask."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(
        self, x: torch.Tensor, return_features: bool = False, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        if mask is not None:
            h = h * mask
        if return_features:
            return h
        return self.fc2(h)


class BagOfWords(nn.Module):
    """A text classifier on token ids: an embedding averaged over the tokens, then an MLP."""

    def __init__(self, vocabulary: int = 50, dimensions: int = 12, classes: int = 3) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, dimensions, padding_idx=0)
        self.fc1 = nn.Linear(dimensions, 16)
        self.fc2 = nn.Linear(16, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(self.embedding(tokens).mean(dim=1))))


class SqueezeExcite(nn.Module):
    """A CNN with a squeeze-and-excitation gate (MobileNetV3's, SENet's): each channel scaled by a gate
    computed from all channels' means, ``x * sigmoid(fc2(relu(fc1(mean(x)))))``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc1 = nn.Conv2d(16, 4, 1)
        self.fc2 = nn.Conv2d(4, 16, 1)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(h, 1)))))
        return self.head((h * gate).mean((2, 3)))


class KimCNN(nn.Module):
    """Kim's (2014) sentence CNN as it is usually written: token embeddings, convolutions of several
    widths over time, a max over time each, concatenated, dropout, a linear head."""

    def __init__(
        self, vocabulary: int = 60, dimensions: int = 10, filters: int = 6, classes: int = 3
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, dimensions)
        self.convs = nn.ModuleList([nn.Conv1d(dimensions, filters, width) for width in (2, 3, 4)])
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(3 * filters, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens).permute(0, 2, 1)
        x = [F.relu(conv(x)) for conv in self.convs]
        x = [F.max_pool1d(c, c.size(2)).squeeze(2) for c in x]
        return self.fc(self.dropout(torch.cat(x, 1)))


class Reordered(nn.Sequential):
    """An ``nn.Sequential`` subclass whose forward runs its layers in another order than registered."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(10, 16), nn.Linear(12, 5), nn.Linear(16, 12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self[1](torch.tanh(self[2](F.relu(self[0](x)))))


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock as written there: one ReLU module used twice, ``out += identity``,
    a projection (1x1 conv + BatchNorm) named ``downsample`` when the shape changes."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class SmallResNet(nn.Module):
    """A torchvision-style ResNet: stem, two stages of two BasicBlocks (the second opening with a strided
    projection), global pooling, a Linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2), BasicBlock(2 * width, 2 * width))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class TiedNet(nn.Module):
    """Two Linear layers sharing one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc2.weight = self.fc1.weight
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


class CalledTwice(nn.Module):
    """One Linear applied twice in the forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc(F.relu(self.fc(x)))))


class DataDependent(nn.Module):
    """Python control flow on tensor values: symbolic tracing cannot follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if h.mean() > 0:
            h = F.relu(h)
        return self.head(h)


class TextCNN(nn.Module):
    """A text classifier's convolution over time and a max over time, written the ways people write
    it: ``x.max(dim=2).values`` (the usual idiom), ``torch.max(x, 2)[0]``, ``x.amax(2)`` or a pooling."""

    def __init__(self, pooling: str = "values") -> None:
        super().__init__()
        self.pooling = pooling
        self.conv = nn.Conv1d(6, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        if self.pooling == "values":
            x = x.max(dim=2).values
        elif self.pooling == "index":
            x = torch.max(x, 2)[0]
        elif self.pooling == "amax":
            x = x.amax(dim=2)
        else:
            x = F.adaptive_max_pool1d(x, 1).flatten(1)
        return self.fc(x)


class Transposed(nn.Module):
    """Neurons transposed (and back) by the ``.T`` attribute: a rule fusion does not have."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc(x)).T.T)


class MaxOfBranches(nn.Module):
    """Two branches joined by an element-wise maximum (a maxout unit): their channels line up."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(torch.maximum(self.a(x), self.b(x))))


class IncomeClassifier(nn.Module):
    """Flower's fl-tabular example's model, as written there: one sigmoid output for two classes."""

    def __init__(self, input_dim: int = 14) -> None:
        super().__init__()
        self.layer1 = nn.Linear(input_dim, 128)
        self.layer2 = nn.Linear(128, 64)
        self.output = nn.Linear(64, 1)
        self.relu = nn.ReLU()
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.layer1(x))
        x = self.relu(self.layer2(x))
        return self.sigmoid(self.output(x))


class Regressor(nn.Module):
    """A regression model returning one value per sample, ``[N]``: its one output neuron squeezed."""

    def __init__(self, input_dim: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(input_dim, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class SummedOutput(nn.Module):
    """Returns the sum of its last layer's neurons: which neuron is which class cannot be told."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc(x))).sum(1)


class GroupNormResNet(nn.Module):
    """A residual CNN with GroupNorm in place of BatchNorm, as federated learning often writes it (batch
    statistics of non-IID clients disagree): the second norm of the block feeds the residual sum."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(4, 16)
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(4, 16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(4, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn(self.stem(x)))
        out = F.relu(self.gn1(self.conv1(x)))
        x = F.relu(self.gn2(self.conv2(out)) + x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class LayerNormMLP(nn.Module):
    """An MLP with a LayerNorm after each hidden layer and a pre-norm residual block."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(20, 32)
        self.ln1 = nn.LayerNorm(32)
        self.ln2 = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 48)
        self.fc3 = nn.Linear(48, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.ln1(self.fc1(x)))
        h = h + self.fc3(F.gelu(self.fc2(self.ln2(h))))
        return self.head(h)


class PReLUNet(nn.Module):
    """PReLU activations: one slope per channel after a convolution, one shared slope after a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.act1 = nn.PReLU(8)
        self.fc1 = nn.Linear(8 * 6 * 6, 24)
        self.act2 = nn.PReLU()
        self.fc2 = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act2(self.fc1(self.act1(self.conv(x)).flatten(1))))


class NormalisingNet(nn.Module):
    """Normalises its input with buffers (MNIST's mean and std), reshaped in the forward, and shifts it by
    a tensor made from literals: what fx would otherwise bake in as constants of the traced model."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.1307]))
        self.register_buffer("std", torch.tensor([0.3081]))
        self.conv = nn.Conv2d(1, 8, 3)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1) + torch.tensor([0.5])
        return self.fc(F.relu(self.conv(x)).flatten(1))


class UpsamplingNet(nn.Module):
    """A transposed convolution between two layers: no closed form, but its output channels are known."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.up(F.relu(self.conv(x)))).mean((2, 3)))


class CharLSTM(nn.Module):
    """A next-character model in the style of LEAF's Shakespeare task: embedding, LSTM, last output."""

    def __init__(self, vocabulary: int = 30, classes: int = 4) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, 8)
        self.lstm = nn.LSTM(8, 32, batch_first=True)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embedding(x))
        return self.fc(out[:, -1, :])


class StateLSTM(nn.Module):
    """A two-layer LSTM classifier reading the last layer's final hidden state, ``h[-1]``."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(30, 8)
        self.lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(self.embedding(x))
        return self.fc(h[-1])


class BidirectionalGRU(nn.Module):
    """A bidirectional GRU over the input's time steps, its outputs averaged over time."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(30, 16, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(F.one_hot(x, 30).float())
        return self.fc(out.mean(1))


class TransformerClassifier(nn.Module):
    """A text classifier built on torch's own ``nn.TransformerEncoder``, its tokens averaged."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(30, 16)
        layer = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(self.embedding(x)).mean(dim=1))


class AttentionResidual(nn.Module):
    """Self-attention over a sequence of feature vectors, added to its input: ``a, _ = self.attention(h,
    h, h)``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 16)
        self.attention = nn.MultiheadAttention(16, num_heads=2, batch_first=True)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        a, _ = self.attention(h, h, h)
        return self.fc((h + a).mean(dim=1))


class ConvLayerNorm(nn.Module):
    """A CNN normalised by a LayerNorm over each sample's channels and positions (``[C, H, W]``), as some
    federated CNNs replace BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.norm = nn.LayerNorm([8, 6, 6])
        self.fc = nn.Linear(8 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.norm(self.conv(x))).view(x.size(0), -1))


class Chomp1d(nn.Module):
    """Cuts a causal convolution's padding off the end of the time axis."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, : -self.size].contiguous()


class TemporalBlock(nn.Module):
    """locuslab's TCN block, as its code has it: each convolution registered as ``self.conv1`` and again
    inside ``self.net``, which forward calls."""

    def __init__(self, n_in: int, n_out: int, dilation: int) -> None:
        super().__init__()
        pad = 2 * dilation
        self.conv1 = nn.Conv1d(n_in, n_out, 3, padding=pad, dilation=dilation)
        self.conv2 = nn.Conv1d(n_out, n_out, 3, padding=pad, dilation=dilation)
        self.net = nn.Sequential(
            self.conv1, Chomp1d(pad), nn.ReLU(), nn.Dropout(0.2), self.conv2, Chomp1d(pad), nn.ReLU()
        )
        self.downsample = nn.Conv1d(n_in, n_out, 1) if n_in != n_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = x if self.downsample is None else self.downsample(x)
        return F.relu(self.net(x) + res)


class TCN(nn.Module):
    """A temporal convolutional network over ``[N, channels, time]``, classified from its last step."""

    def __init__(self) -> None:
        super().__init__()
        self.network = nn.Sequential(TemporalBlock(3, 12, 1), TemporalBlock(12, 12, 2))
        self.linear = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.network(x)[:, :, -1])


class AttentionPooling(nn.Module):
    """Attention pooling over time: a score per step (one neuron), softmaxed over time, weights the steps'
    features: ``(w * h).sum(1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 16)
        self.score = nn.Linear(16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(x))
        w = torch.softmax(self.score(h), dim=1)
        return self.fc((w * h).sum(1))


class BidirectionalLSTMState(nn.Module):
    """The usual bidirectional LSTM text classifier: both directions' final states, concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(30, 12, padding_idx=0)
        self.lstm = nn.LSTM(12, 10, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(20, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(self.embedding(x))
        return self.fc(torch.cat((h[-2], h[-1]), dim=1))


class SplitBranches(nn.Module):
    """Channels split in two halves, each through its own convolution, then concatenated again."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.left = nn.Conv2d(8, 8, 3, padding=1)
        self.right = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        a, b = torch.split(x, 8, dim=1)
        x = torch.cat([F.relu(self.left(a)), F.relu(self.right(b))], dim=1)
        return self.fc(F.adaptive_avg_pool2d(x, (1, 1)).view(x.size(0), -1))


class MaxOverTime(nn.Module):
    """A 1-d CNN over ``[N, T, features]`` sequences, max-pooled over time with the indices thrown away:
    ``x, _ = torch.max(x, dim=2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(6, 16, 5, padding=2)
        self.conv2 = nn.Conv1d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x.permute(0, 2, 1)))
        x, _ = torch.max(F.relu(self.conv2(x)), dim=2)
        return self.fc(x)


class Bottleneck(nn.Module):
    """DenseNet-BC's layer: pre-activation (BatchNorm, ReLU) 1x1 then 3x3 convolutions, its output
    concatenated in front of its input."""

    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class DenseNetBC(nn.Module):
    """A small DenseNet-BC in kuangliu's style: one dense block of two bottlenecks, BatchNorm before the
    head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.dense = nn.Sequential(Bottleneck(8, 4), Bottleneck(12, 4))
        self.bn = nn.BatchNorm2d(16)
        self.linear = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.avg_pool2d(F.relu(self.bn(self.dense(self.conv1(x)))), 8)
        return self.linear(out.view(out.size(0), -1))


class TabularEmbeddings(nn.Module):
    """A tabular model on one tensor: the first three columns are categories (``x[:, :3].long()``), each
    embedded, beside the numeric columns through a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList([nn.Embedding(cardinality, 3) for cardinality in (5, 7, 3)])
        self.numeric = nn.BatchNorm1d(4)
        self.mlp = nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        categories = x[:, :3].long()
        embedded = torch.cat([embedding(categories[:, i]) for i, embedding in enumerate(self.embeddings)], 1)
        return self.mlp(torch.cat([embedded, self.numeric(x[:, 3:])], 1))


class PreActBlock(nn.Module):
    """A pre-activation residual block (He et al. 2016): BatchNorm and ReLU before each convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + x


class PreActResNet(nn.Module):
    """A small pre-activation ResNet: its BatchNorms follow sums, not layers, except the second of each
    block."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(PreActBlock(8), PreActBlock(8))
        self.bn = nn.BatchNorm2d(8)
        self.linear = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class FunctionalConvNet(nn.Module):
    """Layers called as functions with its own parameters, as a MAML-style learner writes them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_weight = nn.Parameter(torch.randn(12, 1, 3, 3) * 0.3)
        self.conv_bias = nn.Parameter(torch.zeros(12))
        self.fc_weight = nn.Parameter(torch.randn(4, 12 * 4) * 0.2)
        self.fc_bias = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.conv2d(x, self.conv_weight, self.conv_bias, padding=1))
        return F.linear(F.max_pool2d(x, 4).flatten(1), self.fc_weight, self.fc_bias)


class SquaredFeatures(nn.Module):
    """A hidden layer read beside its square: ``torch.cat([h, h ** 2], 1)`` (and ``h.pow(2)``)."""

    def __init__(self, method: bool = False) -> None:
        super().__init__()
        self.method = method
        self.fc1 = nn.Linear(16, 24)
        self.fc2 = nn.Linear(48, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x))
        return self.fc2(torch.cat([h, h.pow(2) if self.method else h**2], 1))


class StatisticsPooling(nn.Module):
    """An audio/sequence model pooling each channel over time by its mean, standard deviation and
    log-sum-exp (x-vector style statistics pooling)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 12, 3, padding=1)
        self.conv2 = nn.Conv1d(12, 12, 3, padding=1)
        self.fc = nn.Linear(36, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(torch.cat([x.mean(-1), x.std(-1), torch.logsumexp(x, dim=-1)], 1))


class SamePaddingCNN(nn.Module):
    """TensorFlow's 'same' padding written with ``F.pad`` before unpadded convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.conv2 = nn.Conv2d(8, 12, 4)
        self.fc = nn.Linear(12 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(F.pad(x, (1, 1, 1, 1))))
        x = F.relu(self.conv2(F.pad(x, [1, 2, 1, 2], mode="constant", value=0.0)))
        return self.fc(F.max_pool2d(x, 4).flatten(1))
