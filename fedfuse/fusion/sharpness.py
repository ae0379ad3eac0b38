"""How sharp a model's loss is on the calibration set: the largest eigenvalue of the Hessian of its mean
cross-entropy with respect to all its parameters, by power iteration on Hessian-vector products.

Clients trained by SGD at learning rate η (momentum β) settle where this is about 2(1 + β)/η (the edge of
stability): sharper, and their next step diverges. A fused model is not trained that way, so it can be
sharper than every client it came from, and then the clients of the next round, starting from it, diverge
at their usual learning rate. Fusion keeps the fused model no sharper than its sharpest parent
(`FusionConfig.sharpness`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POWER_ITERATIONS = 20
SAMPLES = 512


def sharpness(model: nn.Module, inputs: Tensor, labels: Tensor, seed: int) -> float:
    """The largest eigenvalue of the Hessian of the mean cross-entropy of ``model`` (in its current mode)
    on ``inputs`` and ``labels`` (at most `SAMPLES` of them), from `POWER_ITERATIONS` power iterations
    started from a seeded random direction."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    inputs, labels = inputs[:SAMPLES], labels[:SAMPLES]
    with torch.enable_grad():
        loss = F.cross_entropy(model(inputs), labels)
        gradients = torch.autograd.grad(loss, parameters, create_graph=True)
        generator = torch.Generator().manual_seed(seed)
        vector = [torch.randn(p.shape, generator=generator).to(p) for p in parameters]
        eigenvalue = 0.0
        for _ in range(POWER_ITERATIONS):
            norm = torch.sqrt(sum((v * v).sum() for v in vector))
            vector = [v / norm for v in vector]
            product = torch.autograd.grad(gradients, parameters, vector, retain_graph=True)
            eigenvalue = float(sum((h * v).sum() for h, v in zip(product, vector)))
            vector = [h.detach() for h in product]
    return eigenvalue
