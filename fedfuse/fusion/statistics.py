"""Streaming sufficient statistics of one level: all that grouping and the least-squares fit need.

For a level with fused inputs X (``[rows, d]``: the fused model's own input to the level, unfolded into
patches for a convolution) and parent neuron values Z (``[rows, K·n]``: every parent's pre-activation
output, one column per parent neuron), grouping needs only the Gram matrix ZᵀZ (inner products between
neurons, so distances and weighted means), and the fit needs only XᵀX and XᵀT = (XᵀZ)·A, where A holds the
grouping's importance-weighted shares. All are sums over rows, accumulated batch by batch in float64:
memory is O((d + K·n)²), whatever the calibration set's size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedfuse.fusion.levels import Level


def layer_inputs(layer: nn.Module, x: Tensor) -> Tensor:
    """The rows a layer multiplies by its weight: ``[rows, fan_in]``.

    A Linear's input ``[..., in_features]`` gives one row per leading index; a Conv2d's input
    ``[B, C, H, W]`` gives one row per output position: its patch, ``C·kh·kw`` values in the order of
    ``weight.flatten(1)``. Padding of every mode (and ``padding="same"``) is applied as the layer does.
    """
    if isinstance(layer, nn.Conv2d):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        padded = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
        patches = F.unfold(padded, layer.kernel_size, dilation=layer.dilation, stride=layer.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def neuron_values(level: Level, output: Tensor) -> Tensor:
    """A level's output as ``[rows, n]``: one column per neuron, rows aligned with `layer_inputs`."""
    if level.kind == "conv2d":
        return output.permute(0, 2, 3, 1).reshape(-1, output.shape[1])
    return output.reshape(-1, output.shape[-1])


class LevelStatistics:
    """Sums over calibration rows of one level, for fused inputs of width d and m = K·n parent neurons.

    Attributes:
        rows: calibration rows seen (samples × output positions).
        xtx: ``[d, d]`` XᵀX.   x_sum: ``[d]`` column sums of X.
        xtz: ``[d, m]`` XᵀZ.   z_sum: ``[m]`` column sums of Z.
        ztz: ``[m, m]`` ZᵀZ, the neurons' Gram matrix.
    """

    def __init__(self, fan_in: int, neurons: int, device: torch.device) -> None:
        def zeros(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        self.rows = 0
        self.xtx, self.x_sum = zeros(fan_in, fan_in), zeros(fan_in)
        self.xtz, self.z_sum = zeros(fan_in, neurons), zeros(neurons)
        self.ztz = zeros(neurons, neurons)

    def add(self, x: Tensor, z: Tensor) -> None:
        """Add a batch: ``x`` ``[rows, d]`` fused inputs and ``z`` ``[rows, m]`` parent neuron values."""
        x, z = x.double(), z.double()
        self.rows += x.shape[0]
        self.xtx.addmm_(x.T, x)
        self.x_sum += x.sum(0)
        self.xtz.addmm_(x.T, z)
        self.z_sum += z.sum(0)
        self.ztz.addmm_(z.T, z)

    def with_bias(self) -> tuple[Tensor, Tensor]:
        """``(XᵀX, XᵀZ)`` for X with a column of ones appended: ``[d+1, d+1]`` and ``[d+1, m]``."""
        d = self.xtx.shape[0]
        xtx = self.xtx.new_empty(d + 1, d + 1)
        xtx[:d, :d] = self.xtx
        xtx[:d, d] = xtx[d, :d] = self.x_sum
        xtx[d, d] = self.rows
        return xtx, torch.cat([self.xtz, self.z_sum.unsqueeze(0)])
