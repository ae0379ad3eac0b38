"""Streaming sufficient statistics of one level: all that grouping and the least-squares fit need.

For a level with fused inputs X (``[rows, d]``: the fused model's own input to the level, unfolded into
patches for a convolution) and parent neuron values Z (``[rows, K·n]``: every parent's value at the
level's target, one column per parent neuron), the targets are T = Z·A + U: A holds the grouping's
importance-weighted shares, and U (``[rows, g]``) is what the targets add beyond a mix of the parents'
values: minus the fused model's other terms of the residual sum the level completes, or the whole target
when it is no linear mix (the log of a mixture of the parents' probabilities; A is then 0). The fit needs
XᵀX and XᵀT = (XᵀZ)·A + XᵀU; grouping needs the Gram matrix ZᵀZ; the fit's R² needs ZᵀU and the norms
of U. All are sums over rows, accumulated batch by batch in float64: memory is O((d + K·n)²), whatever
the calibration set's size.
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


def rows_of(values: Tensor, axis: int) -> Tensor:
    """Values with neurons along ``axis`` as ``[rows, neurons]``: one row per sample and position."""
    return values.movedim(axis, -1).reshape(-1, values.shape[axis])


class NeuronGram:
    """Sums over rows of the neuron values Z ``[rows, m]`` of one place: all that grouping needs.

    Attributes:
        gram: ``[m, m]`` ZᵀZ.  sums: ``[m]`` column sums.  rows: rows seen.
    """

    def __init__(self) -> None:
        self.gram: Tensor | None = None
        self.sums: Tensor | None = None
        self.rows = 0

    def add(self, z: Tensor) -> None:
        z = z.double()
        self.gram = z.T @ z if self.gram is None else self.gram.addmm_(z.T, z)
        self.sums = z.sum(0) if self.sums is None else self.sums + z.sum(0)
        self.rows += z.shape[0]

    @property
    def variances(self) -> Tensor:
        """``[m]`` each neuron's variance times the rows: its spread around its own mean."""
        assert self.gram is not None and self.sums is not None
        return (self.gram.diagonal() - self.sums**2 / self.rows).clamp_min(0)


class LevelStatistics:
    """Sums over calibration rows of one level, for fused inputs of width d, m = K·n parent neurons and
    g fused neurons.

    Attributes:
        rows: calibration rows seen (samples × output positions).
        xtx: ``[d, d]`` XᵀX.   x_sum: ``[d]`` column sums of X.
        xtz: ``[d, m]`` XᵀZ.   z: the parents' `NeuronGram` (ZᵀZ, ΣZ).
        xtu: ``[d, g]`` XᵀU.   ztu: ``[m, g]`` ZᵀU.   u_sum, u_squares: ``[g]`` ΣU and ΣU² per neuron.
    """

    def __init__(self, fan_in: int, neurons: int, groups: int, device: torch.device) -> None:
        def zeros(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        self.rows = 0
        self.xtx, self.x_sum = zeros(fan_in, fan_in), zeros(fan_in)
        self.xtz = zeros(fan_in, neurons)
        self.z = NeuronGram()
        self.xtu, self.ztu = zeros(fan_in, groups), zeros(neurons, groups)
        self.u_sum, self.u_squares = zeros(groups), zeros(groups)

    def add(self, x: Tensor, z: Tensor, u: Tensor | None) -> None:
        """Add a batch: ``x`` ``[rows, d]`` fused inputs, ``z`` ``[rows, m]`` parent neuron values and
        ``u`` ``[rows, g]`` the targets' offset (None: zero)."""
        x, z = x.double(), z.double()
        self.rows += x.shape[0]
        self.xtx.addmm_(x.T, x)
        self.x_sum += x.sum(0)
        self.xtz.addmm_(x.T, z)
        self.z.add(z)
        if u is not None:
            u = u.double()
            self.xtu.addmm_(x.T, u)
            self.ztu.addmm_(z.T, u)
            self.u_sum += u.sum(0)
            self.u_squares += (u * u).sum(0)

    def with_bias(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(XᵀX, XᵀZ, XᵀU)`` for X with a column of ones appended: ``[d+1, d+1]``, ``[d+1, m]``,
        ``[d+1, g]``."""
        d = self.xtx.shape[0]
        xtx = self.xtx.new_empty(d + 1, d + 1)
        xtx[:d, :d] = self.xtx
        xtx[:d, d] = xtx[d, :d] = self.x_sum
        xtx[d, d] = self.rows
        assert self.z.sums is not None
        return (
            xtx,
            torch.cat([self.xtz, self.z.sums.unsqueeze(0)]),
            torch.cat([self.xtu, self.u_sum.unsqueeze(0)]),
        )
