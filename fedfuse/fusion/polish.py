"""An optional short polish of the fused model on the calibration set, after fusion.

The whole fused model is trained for a few epochs toward the calibration labels and the parents'
class-weighted softmax ensemble (cross-entropy to each, equally), in eval mode (BatchNorm keeps its
statistics, Dropout is off), with early stopping on a held-out fifth of the calibration samples and the
best weights restored: a few hundred samples are quickly overfitted, and the held-out loss stops that.
Off by default (``FusionConfig.polish_epochs = 0``): measured in docs/benchmarks.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedfuse.fusion.calibration import CalibrationSet

POLISH_LEARNING_RATE = 1e-3
POLISH_PATIENCE = 3


def polish(
    fused: nn.Module,
    parents: list[nn.Module],
    calibration: CalibrationSet,
    class_weights: Tensor,
    epochs: int,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> int:
    """Train ``fused`` in place; returns the epochs run. Needs a labelled calibration set."""
    inputs, labels, teacher = [], [], []
    weights = class_weights.to(device, torch.float64).log()
    with torch.no_grad():
        for x, y in calibration.batches(device, dtype):
            assert y is not None
            log_probabilities = torch.stack([F.log_softmax(parent(x).double(), dim=1) for parent in parents])
            teacher.append(torch.logsumexp(log_probabilities + weights[:, None, :], dim=0).exp().to(dtype))
            inputs.append(x)
            labels.append(y)
    x, y, target = torch.cat(inputs), torch.cat(labels), torch.cat(teacher)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    held_out = max(1, len(x) // 5)
    validation, training = order[:held_out], order[held_out:]
    parameters = [p for p in fused.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=POLISH_LEARNING_RATE)

    def loss(index: Tensor) -> Tensor:
        logits = fused(x[index])
        return F.cross_entropy(logits, y[index]) + F.cross_entropy(logits, target[index])

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(fused(x[validation]), y[validation]))

    best, best_state, stale, run = held_out_loss(), [p.detach().clone() for p in parameters], 0, 0
    with torch.enable_grad():
        for epoch in range(1, epochs + 1):
            run = epoch
            for batch in training[torch.randperm(len(training), generator=generator)].split(32):
                optimizer.zero_grad()
                loss(batch).backward()
                optimizer.step()
            current = held_out_loss()
            if current < best:
                best, best_state, stale = current, [p.detach().clone() for p in parameters], 0
            else:
                stale += 1
                if stale >= POLISH_PATIENCE:
                    break
    with torch.no_grad():
        for parameter, value in zip(parameters, best_state):
            parameter.copy_(value)
    return run
