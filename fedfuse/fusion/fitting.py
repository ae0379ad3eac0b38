"""The linear variant's fit: one ridge least-squares solve per level, for all its neurons at once, and
writing the solution into the fused model's layer (and BatchNorm) so that the model computes it.

`solve_level` is pure tensor math on accumulated statistics; `write_level` is the module surgery, kept
apart as in ``torch.nn.utils.fusion``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedfuse.fusion.statistics import LevelStatistics

#: Relative size below which an eigenvalue of the (normalised) input Gram matrix counts as zero.
RANK_TOLERANCE = 1e-10


@dataclass(frozen=True)
class LevelFit:
    """A fitted level.

    Attributes:
        weight: ``[d, groups]``: neuron k computes ``x @ weight[:, k] + bias[k]`` on its input row x.
        bias: ``[groups]`` (zeros when the level has no bias).
        r2: R² of the fitted outputs against the group targets over the calibration rows, pooled.
        output_mean, output_var: ``[groups]`` mean and variance of the fitted outputs over the rows.
        rank: the numerical rank of the inputs (with the bias column when there is a bias).
        live: the inputs (bias included) that are not zero on every calibration row; a rank below it
            means the calibration set does not span them (an input that is always zero, such as a dead
            ReLU, cannot be spanned by any set and does not count).
        fan_in: the inputs of one neuron, bias included.
    """

    weight: Tensor
    bias: Tensor
    r2: float
    output_mean: Tensor
    output_var: Tensor
    rank: int
    live: int
    fan_in: int


def solve_level(
    stats: LevelStatistics, ridge: float, with_bias: bool, prior: Tensor | None = None
) -> LevelFit:
    """Solve min_W ‖X·W − T‖² + λ‖W − W₀‖² (bias unpenalised) from accumulated statistics; W₀ is
    ``prior`` (``[d (+1), g]``, the layout of the solution), or zero.

    λ is ``ridge`` times the mean diagonal of XᵀX, so it does not depend on the inputs' overall scale. It is
    the same for every input: an input the calibration set barely excites gets no larger weight than the
    prior's (a penalty scaled per input, as for standardised inputs, lets such rare inputs take huge
    weights, which made fused models far sharper than their parents). With ``ridge == 0`` the least-squares
    solution nearest the prior is taken (with no prior, the paper's pseudo-inverse).
    """
    xtx, xtt = stats.with_bias() if with_bias else (stats.xtx, stats.xtt)
    fan_in = stats.xtx.shape[0]
    penalty = ridge * stats.xtx.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    right = xtt.clone()
    fitted: Tensor | None = None  # XᵀX·W, once the solution W is known
    if prior is not None and ridge > 0:
        right[:fan_in] += penalty * prior[:fan_in]
    if ridge > 0:
        regularised = xtx.clone()
        regularised.diagonal()[:fan_in] += penalty
        factor, info = torch.linalg.cholesky_ex(regularised)
        if info == 0:
            solution = torch.cholesky_solve(right, factor)
            # (XᵀX + λI′)·W = right, so XᵀX·W = right − λI′·W: no second product with XᵀX.
            fitted = right.clone()
            fitted[:fan_in] -= penalty * solution[:fan_in]
        else:
            solution = _min_norm(regularised, right)
    elif prior is not None:  # the least-squares solution nearest the prior: W₀ + min-norm fit of the rest
        solution = prior + _min_norm(xtx, xtt - xtx @ prior)
    else:
        solution = _min_norm(xtx, xtt)
    weight = solution[:fan_in]
    bias = solution[fan_in] if with_bias else torch.zeros_like(stats.t_sum)

    rows = stats.rows
    target_energy, target_mean = stats.t_squares, stats.t_sum / rows
    if fitted is None:
        fitted = xtx @ solution
    output_energy = (solution * fitted).sum(0)  # ‖X·w‖² per output
    residual = (target_energy - 2 * (solution * xtt).sum(0) + output_energy).sum().clamp_min(0)
    spread = (target_energy - rows * target_mean**2).sum()
    r2 = float(1 - residual / spread) if spread > 0 else float(residual <= 1e-12 * target_energy.sum())
    output_mean = (stats.x_sum @ weight) / rows + bias
    output_var = (output_energy / rows - output_mean**2).clamp_min(0)
    rank, live = numerical_rank(xtx)
    return LevelFit(weight, bias, r2, output_mean, output_var, rank, live, xtx.shape[0])


def numerical_rank(gram: Tensor) -> tuple[int, int]:
    """The numerical rank of a Gram matrix XᵀX (how many directions the rows of X span), and how many
    columns of X are not zero throughout.

    Scale-free (the matrix is first normalised to a unit diagonal). The rank is where a Cholesky
    factorisation with complete pivoting (LAPACK's ``dpstrf``) runs out of pivots above the tolerance:
    O(d²·rank), several times cheaper than counting eigenvalues, and the same count wherever the
    spectrum has a clear gap, as it has when the rows are fewer than the inputs or an input is constant.
    """
    from scipy.linalg import lapack  # imported on first use: `import fedfuse` stays light

    diagonal = gram.diagonal()
    alive = diagonal > diagonal.max().clamp_min(torch.finfo(torch.float64).tiny) * RANK_TOLERANCE
    inverse_root = torch.where(alive, diagonal.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), 0.0)
    normalised = gram * inverse_root[:, None] * inverse_root[None, :]
    live = int(alive.sum())
    if not live:
        return 0, 0
    *_, rank, info = lapack.dpstrf(normalised.cpu().numpy(), lower=1, tol=RANK_TOLERANCE * gram.shape[0])
    if info < 0:
        raise RuntimeError(f"LAPACK dpstrf rejected argument {-info}")
    return int(rank), live


def _min_norm(matrix: Tensor, rhs: Tensor) -> Tensor:
    return torch.linalg.lstsq(matrix.cpu(), rhs.cpu(), driver="gelsd").solution.to(matrix.device)


def write_level(
    layer: nn.Module,
    norm: nn.Module | None,
    weight: Tensor,
    bias: Tensor,
    output_mean: Tensor,
    output_var: Tensor,
) -> None:
    """Make ``layer`` (and its folded BatchNorm) compute the map ``x @ weight + bias`` (``weight``
    ``[d, groups]`` in the layout of `solve_level`), keeping every state_dict key.

    Without BatchNorm the layer takes the fitted weight and bias. With one, the layer takes the fitted
    weight (and bias, if it has one) and the BatchNorm is refitted so that, in eval mode, it passes the
    layer's output through unchanged but for the bias the layer lacks: its running statistics become the
    mean and variance of the layer's output on the calibration set, and its affine parameters undo them.
    So the statistics are right for the fused weights, and training the fused model further (as the
    next federated round does, with batch statistics) starts from the same function.
    """
    with torch.no_grad():
        layer.weight.copy_(weight.T.reshape(layer.weight.shape))
        layer_bias = bias if layer.bias is not None else torch.zeros_like(bias)
        if layer.bias is not None:
            layer.bias.copy_(bias)
        if norm is None:
            return
        missing_bias = bias - layer_bias
        mean = output_mean - missing_bias
        if norm.affine:
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(output_var)
            norm.weight.copy_((output_var + norm.eps).sqrt())
            norm.bias.copy_(mean + missing_bias)
        else:
            norm.running_mean.copy_(-missing_bias)
            norm.running_var.fill_(1.0 - norm.eps)
