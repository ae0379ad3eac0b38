"""How much a model's first layer reveals about the server's calibration inputs.

A fused weight row fitted by minimum-norm least squares on N calibration inputs (N below the fan-in)
lies exactly in the span of those inputs: any client of the next round can read the span off the fused
model, and with few calibration samples rebuild them. A client's own rows have no reason to lie there.
So the share of a row's energy outside the calibration span measures the leak: near 0 for a fit that
reveals the span, about 1 - N/fan_in for rows with no relation to it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def energy_outside_span(rows: Tensor, inputs: Tensor) -> float:
    """The mean over ``rows`` (``[n, d]``, a layer's weights) of the share of each row's squared norm that
    lies outside the span of ``inputs`` (``[N, d]``, the calibration inputs, flattened as the layer
    reads them). 0: every row is a combination of calibration inputs."""
    rows, inputs = rows.detach().double(), inputs.detach().double().flatten(1)
    basis = torch.linalg.svd(inputs, full_matrices=False).Vh  # orthonormal rows spanning the inputs
    values = torch.linalg.svdvals(inputs)
    basis = basis[values > values.max() * inputs.shape[1] * torch.finfo(torch.float64).eps]
    inside = (rows @ basis.T).square().sum(1)
    total = rows.square().sum(1).clamp_min(torch.finfo(torch.float64).tiny)
    return float((1 - inside / total).clamp_min(0).mean())
