"""Making a fused model's BatchNorm statistics right for its fused weights, without changing what it computes.

After a level is fitted, the inputs its BatchNorms see are the fused model's, not parent 0's whose
running statistics they still hold. In eval mode that does not matter (the fit took the statistics as
they were), but the next federated round trains the model, and in train mode a BatchNorm normalises
by batch statistics: the model would compute something else. So each BatchNorm's running mean and
variance are set to those of its inputs on the calibration set, and its affine weight and bias are
rescaled so that the eval-mode function stays exactly the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def renormalize_batchnorms(modules: Iterable[nn.Module], run: Callable[[], None]) -> int:
    """Re-estimate the running statistics of every affine BatchNorm inside ``modules`` on the inputs it
    sees while ``run()`` executes, preserving each BatchNorm's eval-mode function. Returns how many.

    γ(u − μ)/√(σ² + ε) + β equals γ'(u − μ')/√(σ'² + ε) + β' for γ' = γ·√(σ'² + ε)/√(σ² + ε) and
    β' = β + γ(μ' − μ)/√(σ² + ε), where μ', σ'² are the mean and (population) variance of the
    BatchNorm's inputs u over the run.
    """
    norms = [
        module
        for root in modules
        for module in root.modules()
        if isinstance(module, _BatchNorm) and module.affine and module.track_running_stats
    ]
    if not norms:
        return 0
    sums: dict[nn.Module, list] = {norm: [0.0, 0.0, 0] for norm in norms}

    def accumulate(norm: nn.Module, args: tuple) -> None:
        values = args[0].detach().double().movedim(1, -1).reshape(-1, norm.num_features)
        entry = sums[norm]
        entry[0] = entry[0] + values.sum(0)
        entry[1] = entry[1] + (values * values).sum(0)
        entry[2] += values.shape[0]

    handles = [norm.register_forward_pre_hook(accumulate) for norm in norms]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        for norm in norms:
            total, squares, count = sums[norm]
            if count == 0:
                continue
            mean = total / count
            var = (squares / count - mean * mean).clamp_min(0)
            _refit(norm, mean, var)
    return len(norms)


def _refit(norm: nn.Module, mean: Tensor, var: Tensor) -> None:
    old_mean, old_scale = norm.running_mean.double(), (norm.running_var.double() + norm.eps).sqrt()
    weight, bias = norm.weight.double(), norm.bias.double()
    new_scale = (var + norm.eps).sqrt()
    norm.bias.copy_(bias + weight * (mean - old_mean) / old_scale)
    norm.weight.copy_(weight * new_scale / old_scale)
    norm.running_mean.copy_(mean)
    norm.running_var.copy_(var)
