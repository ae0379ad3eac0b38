"""Points for grouping: one per parent neuron, with the neurons' pairwise distances, in few dimensions.

Grouping needs the distances ‖z_i − z_j‖ between the neurons' value vectors over all calibration rows,
and those vectors are long for a convolution (samples × positions). `NeuronEmbedding` streams the values
batch by batch and keeps, for m = K·n neurons and a budget of D dimensions, the cheapest of three
embeddings E ``[m, r]`` (r ≤ D), so that the cost of grouping grows linearly with K:

- ``"values"``, exact: when the calibration rows number at most D, the value vectors themselves
  (E = Zᵀ, r = rows). The usual case for Linear levels (one row per sample).
- ``"gram"``, exact: when m ≤ D, the Gram matrix ZᵀZ (m², bounded by D²) and its eigendecomposition
  (O(D³) at most): E = U·Λ^½ has exactly the neurons' pairwise distances (each batch's product is
  computed in the values' own precision, float32 for float32 models, which leaves relative errors near
  1e-6: nothing to grouping, and half the work of float64).
- ``"sketch"``, approximate: otherwise a CountSketch (Charikar, Chen & Farach-Colton 2002; as a
  Johnson-Lindenstrauss transform, Clarkson & Woodruff 2013) of the rows: each row is added, with a
  seeded random sign, to one of D seeded random buckets, so E = (SZ)ᵀ, r = D, memory D·m. Every squared
  distance is preserved in expectation, with a relative standard deviation of at most √(2/D) (4.4% at
  D = 1024). The grouping cost a level reports is measured exactly on the values in any case
  (`fedfuse.fusion.targets.GroupingLoss`), so a sketch shows in the report if it ever groups badly.

Per-neuron sums and sums of squares are kept exactly in every mode (the neurons' scales and variances).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Embedding modes, in order of preference.
MODES = ("values", "gram", "sketch")


class NeuronEmbedding:
    """Streams the values of m neurons at one place and embeds them in at most ``dims`` dimensions.

    Args:
        samples: calibration samples that will be added in all (rows per sample are learnt from the
            first batch, so the mode is fixed before anything is kept).
        dims: the budget D.
        seed: seeds the sketch's buckets and signs (same seed and batches, same embedding).
    """

    def __init__(self, samples: int, dims: int, seed: int) -> None:
        self.samples, self.dims = samples, dims
        self.mode: str | None = None
        self.rows = 0
        self.sums: Tensor | None = None
        self.squares: Tensor | None = None
        self._kept: list[Tensor] = []
        self._gram: Tensor | None = None
        self._sketch: Tensor | None = None
        self._points: Tensor | None = None
        self._generator = torch.Generator().manual_seed(seed)

    def add(self, z: Tensor, samples: int) -> None:
        """Add a batch: ``z`` ``[rows, m]``, the values of the m neurons on ``samples`` samples' rows."""
        if self.mode is None:
            total_rows = -(-z.shape[0] * self.samples // samples)
            exact = "values" if total_rows <= self.dims else "gram"
            self.mode = exact if exact == "values" or z.shape[1] <= self.dims else "sketch"
        self.rows += z.shape[0]
        sums = z.sum(0).double()  # summed in the values' precision: 15x faster than converting each
        self.sums = sums if self.sums is None else self.sums + sums
        if self.mode == "gram":
            # In the values' own precision (the models' float32: half the work of float64), summed over
            # the batches in float64; its diagonal is the sums of squares.
            product = (z.T @ z).double()
            self._gram = product if self._gram is None else self._gram.add_(product)
            squares = product.diagonal()
        else:
            z = z.double()
            squares = (z * z).sum(0)
        self.squares = squares.clone() if self.squares is None else self.squares + squares
        if self.mode == "values":
            self._kept.append(z)
        elif self.mode == "sketch":
            buckets = torch.randint(self.dims, (z.shape[0],), generator=self._generator).to(z.device)
            signs = torch.randint(2, (z.shape[0], 1), generator=self._generator).to(z) * 2 - 1
            if self._sketch is None:
                self._sketch = z.new_zeros(self.dims, z.shape[1])
            self._sketch.index_add_(0, buckets, z * signs)

    @property
    def variances(self) -> Tensor:
        """``[m]`` each neuron's spread around its own mean: Σ (z − z̄)² over the rows."""
        assert self.sums is not None and self.squares is not None
        return (self.squares - self.sums**2 / self.rows).clamp_min(0)

    def points(self) -> Tensor:
        """``[m, r]`` float64 on the CPU: one point per neuron, with the neurons' pairwise distances
        (exactly, but for the sketch). One coordinate of zeros when every neuron is zero."""
        if self._points is None:
            self._points = self._embed().cpu()
            if not self._points.shape[1]:
                self._points = self._points.new_zeros(self._points.shape[0], 1)
        return self._points

    def _embed(self) -> Tensor:
        if self.mode == "values":
            return torch.cat(self._kept).T
        elif self.mode == "gram":
            assert self._gram is not None
            values, vectors = torch.linalg.eigh(self._gram)
            keep = values > values.max().clamp_min(0) * values.shape[0] * torch.finfo(torch.float64).eps
            return vectors[:, keep] * values[keep].sqrt()
        assert self._sketch is not None
        return self._sketch.T
