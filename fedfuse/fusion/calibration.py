"""The server-side calibration set, read as batches as often as fusion needs a pass over it.

Fusion makes several passes over the calibration set (one or more per level) and pairs what it measured
in one pass with what it measures in the next, batch by batch, so every pass must see the same samples
in the same order. A tensor or an (inputs, labels) pair is batched in place; a re-iterable of batches (a
DataLoader, a list) is read once, when the set is built, and its batches are kept: a DataLoader that
shuffles, or augments at random, would otherwise give each pass other samples, and the fused model would
be fitted to mismatched activations (near chance accuracy, and no error). Keeping them costs the set's
size in memory, which for a calibration set of a few thousand samples is small beside the models'.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

Batch = tuple[Tensor, "Tensor | None"]


class CalibrationSet:
    """Calibration inputs, with optional integer class labels, as batches.

    Args:
        data: a tensor of inputs ``[N, ...]``; a tuple ``(inputs, labels)`` with labels ``[N]``
            (integer class indices) or ``None``; or a re-iterable of batches, each a tensor or an
            ``(inputs, labels)`` tuple/list (what a DataLoader yields).
        batch_size: rows per batch when ``data`` is a tensor or a pair; an iterable keeps its batches, and
            so does another `CalibrationSet` (shared, not read again: a Flower strategy reads its
            calibration data once and hands that set to every fusion, screening and comparison).

    Raises:
        TypeError: ``data`` is of none of those forms, or is a one-shot iterator.
        ValueError: the set is empty, or labels do not match the inputs.
    """

    def __init__(self, data: Tensor | tuple | Iterable | CalibrationSet, batch_size: int) -> None:
        if isinstance(data, CalibrationSet):
            self._source: Iterable = data._source
            self.num_samples, self.has_labels, self.label_range = (
                data.num_samples,
                data.has_labels,
                data.label_range,
            )
            return
        if isinstance(data, Tensor):
            data = (data, None)
        if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
            inputs, labels = data
            _check_batch(inputs, labels, where="calibration")
            self._source = [
                (inputs[i : i + batch_size], None if labels is None else labels[i : i + batch_size])
                for i in range(0, len(inputs), batch_size)
            ]
        elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
            if iter(data) is data:
                raise TypeError(
                    "calibration is a one-shot iterator (e.g. a generator); a Flower strategy reads it every "
                    "round, so pass a list of batches or a DataLoader"
                )
            self._source = list(_unpacked(data))  # one read: every pass sees these same batches
        else:
            raise TypeError(
                "calibration must be a tensor, an (inputs, labels) pair or an iterable of batches; "
                f"got {type(data).__name__}"
            )
        self.num_samples, self.has_labels, self.label_range = self._scan()

    def _scan(self) -> tuple[int, bool, tuple[int, int] | None]:
        count, labelled = 0, set()
        low, high = None, None
        for index, (inputs, labels) in enumerate(_unpacked(self._source)):
            where = f"calibration batch {index}"
            _check_batch(inputs, labels, where=where)
            if inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
                raise ValueError(f"{where} holds NaN or Inf inputs")
            count += len(inputs)
            labelled.add(labels is not None)
            if labels is not None and len(labels):
                low = int(labels.min()) if low is None else min(low, int(labels.min()))
                high = int(labels.max()) if high is None else max(high, int(labels.max()))
        if count == 0:
            raise ValueError("the calibration set is empty: fusion needs inputs to compute activations")
        if len(labelled) > 1:
            raise ValueError("some calibration batches have labels and others do not")
        return count, labelled.pop(), None if low is None or high is None else (low, high)

    def example(self, device: torch.device, dtype: torch.dtype, size: int = 8) -> Tensor:
        """The first ``size`` calibration inputs (fewer if the first batch is smaller), to see shapes."""
        inputs, _ = next(self.batches(device, dtype))
        return inputs[:size]

    def head(self, count: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The first ``count`` labelled samples (fewer if the set is smaller), as one batch."""
        inputs, labels, taken = [], [], 0
        for x, y in self.batches(device, dtype):
            assert y is not None
            inputs.append(x[: count - taken])
            labels.append(y[: count - taken])
            taken += len(inputs[-1])
            if taken >= count:
                break
        return torch.cat(inputs), torch.cat(labels)

    def without_labels(self) -> CalibrationSet:
        """The same inputs, in the same batches, without their labels."""
        return CalibrationSet([inputs for inputs, _ in _unpacked(self._source)], batch_size=1)

    def check_labels(self, classes: int) -> None:
        """Labels must be class indices of a model with ``classes`` outputs.

        Raises:
            ValueError: a label outside [0, classes).
        """
        if self.label_range is not None and (self.label_range[0] < 0 or self.label_range[1] >= classes):
            raise ValueError(
                f"calibration labels must be class indices in [0, {classes}) for the models' {classes} "
                f"outputs; they range from {self.label_range[0]} to {self.label_range[1]}"
            )

    def batches(self, device: torch.device, dtype: torch.dtype) -> Iterator[Batch]:
        """Batches on ``device``; floating inputs cast to ``dtype`` (the models' parameter dtype), labels
        to int64 (uint8 labels, as NumPy loaders give them, index tensors as any other)."""
        for inputs, labels in _unpacked(self._source):
            if inputs.is_floating_point():
                inputs = inputs.to(device=device, dtype=dtype)
            else:
                inputs = inputs.to(device)
            yield inputs, None if labels is None else labels.to(device=device, dtype=torch.long)


def _unpacked(source: Iterable) -> Iterator[Batch]:
    for batch in source:
        if isinstance(batch, Tensor):
            yield batch, None
        elif isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 2 and isinstance(batch[0], Tensor):
            yield batch[0], batch[1] if len(batch) == 2 else None
        else:
            raise TypeError(
                "each calibration batch must be a tensor or an (inputs, labels) pair; "
                f"got {type(batch).__name__}"
            )


def _check_batch(inputs: Tensor, labels: Tensor | None, where: str) -> None:
    if inputs.dim() == 0:
        raise ValueError(f"{where}: inputs must have a batch dimension, got a scalar")
    if labels is None:
        return
    if not isinstance(labels, Tensor):
        raise TypeError(f"{where}: labels must be a tensor or None, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(
            f"{where}: labels must be a 1-D tensor of class indices, got {labels.dtype} "
            f"{tuple(labels.shape)} (for models that output a value to regress, pass the inputs alone)"
        )
    if len(labels) != len(inputs):
        raise ValueError(f"{where}: {len(inputs)} inputs but {len(labels)} labels")
