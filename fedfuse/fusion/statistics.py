"""Streaming sufficient statistics of one level: all that the least-squares fit needs.

For a level with fused inputs X (``[rows, d]``: the fused model's own input to the level, unfolded into
patches for a convolution) and targets T (``[rows, g]``: the group targets Z·shares of the parents' neuron
values Z, minus the fused model's other terms of the residual sum the level completes, or the classes'
own target), the fit needs XᵀX and XᵀT, and its R² the sums and squares of T. All are sums over rows,
accumulated batch by batch in float64: memory is O(d² + d·g), whatever the calibration set's size and
however many parents there are (the targets are mixed per batch, the grouping being decided first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def layer_inputs(layer: nn.Module, x: Tensor) -> Tensor:
    """The rows a layer multiplies by its weight: ``[rows, fan_in]``.

    A Linear's input ``[..., in_features]`` gives one row per leading index; a convolution's input
    ``[B, C, *spatial]`` gives one row per output position: its patch, ``C·prod(kernel)`` values in the
    order of ``weight.flatten(1)``. Padding of every mode (and ``padding="same"``) is applied as the layer
    does. Rows line up with `rows_of` the layer's output.
    """
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        padded = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
        if isinstance(layer, nn.Conv1d):  # a 1-D convolution is a 2-D one over a height of 1
            padded = padded.unsqueeze(2)
            kernel, dilation, stride = (1, *layer.kernel_size), (1, *layer.dilation), (1, *layer.stride)
        else:
            kernel, dilation, stride = layer.kernel_size, layer.dilation, layer.stride
        patches = F.unfold(padded, kernel, dilation=dilation, stride=stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def layer_fan_in(layer: nn.Module) -> int:
    """The width of `layer_inputs`' rows: ``in_features``, or ``in_channels · prod(kernel)`` (the layouts of
    the Linear and ungrouped Conv levels the closed form fits)."""
    return int(layer.weight[0].numel())


def rows_of(values: Tensor, axis: int) -> Tensor:
    """Values with neurons along ``axis`` as ``[rows, neurons]``: one row per sample and position."""
    return values.movedim(axis, -1).reshape(-1, values.shape[axis])


class LevelStatistics:
    """Sums over calibration rows of one level, for fused inputs of width d and g fused neurons.

    Attributes:
        rows: calibration rows seen (samples × output positions).
        xtx: ``[d, d]`` XᵀX.   x_sum: ``[d]`` column sums of X.
        xtt: ``[d, g]`` XᵀT.   t_sum, t_squares: ``[g]`` ΣT and ΣT² per neuron.
    """

    def __init__(self, fan_in: int, groups: int, device: torch.device) -> None:
        def zeros(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        self.rows = 0
        self.xtx, self.x_sum = zeros(fan_in, fan_in), zeros(fan_in)
        self.xtt, self.t_sum, self.t_squares = zeros(fan_in, groups), zeros(groups), zeros(groups)

    def add(self, x: Tensor, t: Tensor) -> None:
        """Add a batch: ``x`` ``[rows, d]`` fused inputs and ``t`` ``[rows, g]`` their targets."""
        x, t = x.double(), t.double()
        self.rows += x.shape[0]
        self.xtx.addmm_(x.T, x)
        self.x_sum += x.sum(0)
        self.xtt.addmm_(x.T, t)
        self.t_sum += t.sum(0)
        self.t_squares += (t * t).sum(0)

    def with_bias(self) -> tuple[Tensor, Tensor]:
        """``(XᵀX, XᵀT)`` for X with a column of ones appended: ``[d+1, d+1]`` and ``[d+1, g]``."""
        d = self.xtx.shape[0]
        xtx = self.xtx.new_empty(d + 1, d + 1)
        xtx[:d, :d] = self.xtx
        xtx[:d, d] = xtx[d, :d] = self.x_sum
        xtx[d, d] = self.rows
        return xtx, torch.cat([self.xtt, self.t_sum.unsqueeze(0)])
