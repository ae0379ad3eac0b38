"""Streaming sufficient statistics of one level: all that the least-squares fit needs.

For a level with fused inputs X (``[rows, d]``: the fused model's own input to the level, unfolded into
patches for a convolution) and targets T (``[rows, g]``: the group targets Z·shares of the parents' neuron
values Z, minus the fused model's other terms of the residual sum the level completes, or the classes'
own target), the fit needs XᵀX and XᵀT, and its R² the sums and squares of T. All are sums over rows,
accumulated batch by batch in float64: memory is O(d² + d·g), whatever the calibration set's size and
however many parents there are (the targets are mixed per batch, the grouping being decided first).

While there are no more rows than inputs (a wide Linear level on a few hundred calibration samples:
``fc1`` of PyTorch's MNIST example reads 9,216 inputs), the rows themselves are the smaller record:
they are kept as they come, O(rows · (d + g)), and the fit is solved in their span (`rows`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def layer_inputs(layer: nn.Module, x: Tensor) -> Tensor:
    """The rows a layer multiplies by its weight: ``[..., fan_in]``, the leading dimensions indexing rows
    (flattened, ``[rows, fan_in]``; left unflattened so that a consumer copying them anyway, as
    `LevelStatistics.add` does, makes the only copy).

    A Linear's input ``[..., in_features]`` gives one row per leading index; a convolution's input
    ``[B, C, *spatial]`` gives ``[B, positions, C·prod(kernel)]``, one row per output position: its patch,
    in the order of ``weight.flatten(1)``. Padding of every mode (and ``padding="same"``) is applied as
    the layer does. Rows line up with `rows_of` the layer's output.
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
        return patches.transpose(1, 2)
    return x


def channel_inputs(layer: nn.Module, x: Tensor) -> Tensor:
    """A depthwise convolution's rows: ``[rows, C, prod(kernel)]``, per output position the patch of each
    channel, which only that channel's filter reads (`layer_inputs`' patches, channel by channel)."""
    patches = layer_inputs(layer, x).flatten(0, -2)
    return patches.unflatten(1, (layer.in_channels, -1))


def layer_map(layer: nn.Module, channelwise: bool, x: Tensor, weight: Tensor) -> Tensor:
    """``[rows, g]``: the layer's outputs on ``x`` with the weights ``weight`` (``[fan_in, g]``, the layout
    of the closed-form solution), the bias left out."""
    if channelwise:
        return torch.einsum("rck,kc->rc", channel_inputs(layer, x).to(weight), weight)
    return layer_inputs(layer, x).flatten(0, -2).to(weight) @ weight


def layer_fan_in(layer: nn.Module) -> int:
    """The width of `layer_inputs`' rows: ``in_features``, or ``in_channels · prod(kernel)`` (the layouts of
    the Linear and ungrouped Conv levels the closed form fits)."""
    return int(layer.weight[0].numel())


def rows_of(values: Tensor, axis: int) -> Tensor:
    """Values with neurons along ``axis`` as ``[rows, neurons]``: one row per sample and position."""
    return values.movedim(axis, -1).reshape(-1, values.shape[axis])


class LevelStatistics:
    """Sums over calibration rows of one level, for fused inputs of width d and g fused neurons.

    Each batch's rows R = [X | T] (``[rows, d + g]``, float64) are kept as they are while there are at
    most d of them (`rows`). Past that they are summed: written into a buffer kept from batch to batch,
    and one product RᵀR gives XᵀX, XᵀT and the ΣT² on its diagonal; on the CPU only its upper triangle
    is accumulated, by BLAS's symmetric rank-k update (``dsyrk``, through SciPy): half the
    multiplications of a full product. (A fresh float64 copy of a wide convolution's patches per batch
    costs more than its conversion: the memory is mapped anew each time.)

    Attributes:
        rows: calibration rows seen (samples × output positions).
        xtx: ``[d, d]`` XᵀX.   x_sum: ``[d]`` column sums of X.
        xtt: ``[d, g]`` XᵀT.   t_sum, t_squares: ``[g]`` ΣT and ΣT² per neuron.
    """

    def __init__(self, fan_in: int, groups: int, device: torch.device) -> None:
        width = fan_in + groups
        self.rows = 0
        self._d = fan_in
        # RᵀR: on the CPU its upper triangle, column-major as BLAS writes it; elsewhere the full product.
        cpu = device.type == "cpu"
        self._upper = np.zeros((width, width), order="F") if cpu else None
        self._product = torch.zeros(
            0 if cpu else width, 0 if cpu else width, dtype=torch.float64, device=device
        )
        self._sums = torch.zeros(width, dtype=torch.float64, device=device)
        self._buffer = torch.zeros(0, width, dtype=torch.float64, device=device)
        self._symmetric: Tensor | None = None
        self._kept: list[Tensor] | None = []  # the rows themselves, while there are at most d

    def add(self, x: Tensor, t: Tensor) -> None:
        """Add a batch: ``x`` ``[..., d]`` fused inputs (leading dimensions: rows, as `layer_inputs` gives
        them) and ``t`` ``[rows, g]`` their targets."""
        rows = t.shape[0]
        self._symmetric = None
        if self._kept is not None and self.rows + rows <= self._d:
            batch = torch.empty(rows, self._d + t.shape[1], dtype=torch.float64, device=t.device)
            self._write(batch, x, t)
            self._kept.append(batch)
            return
        if self._kept is not None:  # more rows than inputs: the sums are the smaller record from now on
            kept, self._kept = self._kept, None
            for batch in kept:
                self._accumulate(batch)
        if self._buffer.shape[0] < rows:
            self._buffer = self._buffer.new_empty(rows, self._buffer.shape[1])
        batch = self._buffer[:rows]
        self._write(batch, x, t)
        self._accumulate(batch)

    def _write(self, batch: Tensor, x: Tensor, t: Tensor) -> None:
        batch[:, : self._d].unflatten(0, x.shape[:-1]).copy_(x)
        batch[:, self._d :].copy_(t)
        self.rows += t.shape[0]
        self._sums += batch.sum(0)

    def _accumulate(self, batch: Tensor) -> None:
        if self._upper is not None:
            from scipy.linalg import blas  # imported on first use: `import fedfuse` stays light

            # The batch is row-major [rows, d + g]: its transpose is column-major, as BLAS takes it.
            blas.dsyrk(1.0, batch.numpy().T, beta=1.0, c=self._upper, trans=0, lower=0, overwrite_c=1)
        else:
            self._product.addmm_(batch.T, batch)

    @property
    def kept_rows(self) -> tuple[Tensor, Tensor] | None:
        """``(X, T)``, ``[rows, d]`` and ``[rows, g]``, while there are at most d rows (then the fit is
        solved in their span); None once they were summed."""
        if self._kept is None:
            return None
        rows = torch.cat(self._kept) if self._kept else self._buffer[:0]
        return rows[:, : self._d], rows[:, self._d :]

    @property
    def _full(self) -> Tensor:
        """RᵀR in full, made from the upper triangle once after the last batch (or from the kept rows)."""
        if self._kept is not None:
            if self._symmetric is None:
                x, t = self.kept_rows  # type: ignore[misc]
                rows = torch.cat([x, t], dim=1)
                self._symmetric = rows.T @ rows
            return self._symmetric
        if self._upper is None:
            return self._product
        if self._symmetric is None:
            upper = torch.from_numpy(self._upper)
            self._symmetric = torch.triu(upper) + torch.triu(upper, diagonal=1).T
        return self._symmetric

    @property
    def xtx(self) -> Tensor:
        return self._full[: self._d, : self._d]

    @property
    def xtt(self) -> Tensor:
        return self._full[: self._d, self._d :]

    @property
    def t_squares(self) -> Tensor:
        return self._full.diagonal()[self._d :]

    @property
    def x_sum(self) -> Tensor:
        return self._sums[: self._d]

    @property
    def t_sum(self) -> Tensor:
        return self._sums[self._d :]

    def with_bias(self) -> tuple[Tensor, Tensor]:
        """``(XᵀX, XᵀT)`` for X with a column of ones appended: ``[d+1, d+1]`` and ``[d+1, g]``."""
        gram = self.xtx
        d = gram.shape[0]
        xtx = gram.new_empty(d + 1, d + 1)
        xtx[:d, :d] = gram
        xtx[:d, d] = xtx[d, :d] = self.x_sum
        xtx[d, d] = self.rows
        return xtx, torch.cat([self.xtt, self.t_sum.unsqueeze(0)])


class ChannelStatistics:
    """`LevelStatistics` for a layer whose neuron c reads its own input channel alone (a depthwise
    convolution): one small least-squares problem per channel, so per channel the sums over rows of
    its patch's products (``[C, k, k]``, k = prod(kernel)), its patch against its target and the
    target's sum and squares. Memory O(C · k²), float64.

    Attributes:
        rows: calibration rows seen (samples × output positions).
        xtx: ``[C, k, k]``.  xtt, x_sum: ``[C, k]``.  t_sum, t_squares: ``[C]``.
    """

    def __init__(self, channels: int, kernel: int, device: torch.device) -> None:
        self.rows = 0
        self.xtx = torch.zeros(channels, kernel, kernel, dtype=torch.float64, device=device)
        self.xtt = torch.zeros(channels, kernel, dtype=torch.float64, device=device)
        self.x_sum = torch.zeros(channels, kernel, dtype=torch.float64, device=device)
        self.t_sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.t_squares = torch.zeros(channels, dtype=torch.float64, device=device)

    def add(self, x: Tensor, t: Tensor) -> None:
        """Add a batch: ``x`` ``[rows, C, k]`` (`channel_inputs`) and ``t`` ``[rows, C]`` its targets."""
        x, t = x.double(), t.double()
        self.rows += t.shape[0]
        self.xtx += torch.einsum("rci,rcj->cij", x, x)
        self.xtt += torch.einsum("rci,rc->ci", x, t)
        self.x_sum += x.sum(0)
        self.t_sum += t.sum(0)
        self.t_squares += t.square().sum(0)
