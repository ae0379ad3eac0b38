"""The linear variant's fit: one ridge least-squares solve per level, for all its neurons at once, and
writing the solution into the fused model's layer (and BatchNorm) so that the model computes it.

`solve_level` is pure tensor math on accumulated statistics; `write_level` is the module surgery, kept
apart as in ``torch.nn.utils.fusion``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedfuse.fusion.statistics import ChannelStatistics, LevelStatistics

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

    While ``stats`` keeps its rows (no more than inputs, `LevelStatistics.kept_rows`) the same problem is
    solved in their span (`_solve_in_row_span`): O(rows² · d) instead of O(d³).
    """
    kept = stats.kept_rows
    if kept is not None:
        return _solve_in_row_span(*kept, ridge, with_bias, prior)
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


def solve_channels(
    stats: ChannelStatistics, ridge: float, with_bias: bool, prior: Tensor | None = None
) -> LevelFit:
    """`solve_level` for a layer whose neuron c reads its own input channel alone (a depthwise
    convolution): the same problem, one small system per channel, solved in one batch. λ is ``ridge``
    times the mean diagonal of that channel's XᵀX (each channel is its own problem, at its own scale).

    Returns a `LevelFit` whose ``weight`` is ``[k, C]`` (column c: channel c's filter, k its taps), its
    rank and live inputs summed over the channels, and ``fan_in`` one channel's (k, + 1 with a bias).
    """
    channels, kernel = stats.xtt.shape
    size = kernel + int(with_bias)
    gram = stats.xtx.new_zeros(channels, size, size)
    gram[:, :kernel, :kernel] = stats.xtx
    right = stats.xtt.new_zeros(channels, size)
    right[:, :kernel] = stats.xtt
    if with_bias:
        gram[:, :kernel, kernel] = gram[:, kernel, :kernel] = stats.x_sum
        gram[:, kernel, kernel] = stats.rows
        right[:, kernel] = stats.t_sum
    base = prior.T if prior is not None else right.new_zeros(channels, size)  # [C, size]
    tiny = torch.finfo(torch.float64).tiny
    penalty = ridge * stats.xtx.diagonal(dim1=1, dim2=2).mean(1).clamp_min(tiny)  # [C]
    regularised = gram.clone()
    regularised.diagonal(dim1=1, dim2=2)[:, :kernel] += penalty[:, None]
    rhs = right.clone()
    rhs[:, :kernel] += penalty[:, None] * base[:, :kernel]
    # The solution nearest the prior: W₀ + the minimum-norm solution of what it leaves (with λ > 0 the
    # system is regular and this is its one solution).
    remainder = rhs - (regularised @ base[:, :, None]).squeeze(-1)
    correction = torch.linalg.lstsq(regularised, remainder[:, :, None], driver="gelsd").solution.squeeze(-1)
    solution = base + correction  # [C, size]

    fitted = (gram @ solution[:, :, None]).squeeze(-1)
    output_energy = (solution * fitted).sum(1)
    residual = (stats.t_squares - 2 * (solution * right).sum(1) + output_energy).sum().clamp_min(0)
    spread = (stats.t_squares - stats.t_sum.square() / stats.rows).sum()
    r2 = float(1 - residual / spread) if spread > 0 else float(residual <= 1e-12 * stats.t_squares.sum())
    weight = solution[:, :kernel].T
    bias = solution[:, kernel] if with_bias else torch.zeros_like(stats.t_sum)
    output_mean = (stats.x_sum * solution[:, :kernel]).sum(1) / stats.rows + bias
    output_var = (output_energy / stats.rows - output_mean**2).clamp_min(0)
    rank, live = _channel_ranks(gram)
    return LevelFit(weight, bias, r2, output_mean, output_var, rank, live, size)


def _channel_ranks(grams: Tensor) -> tuple[int, int]:
    """`numerical_rank` of each channel's Gram matrix ``[C, k, k]``, summed: eigenvalues of the matrix
    normalised to a unit diagonal above the same tolerance (the matrices are small)."""
    normalised, alive = _unit_diagonal(grams)
    eigenvalues = torch.linalg.eigvalsh(normalised)
    rank = int((eigenvalues > RANK_TOLERANCE * grams.shape[1]).sum())
    return rank, int(alive.sum())


def _solve_in_row_span(x: Tensor, t: Tensor, ridge: float, with_bias: bool, prior: Tensor | None) -> LevelFit:
    """`solve_level` from the rows themselves, X ``[N, d]`` with N ≤ d and T ``[N, g]``: the solution
    differs from the prior W₀ only within the span of the (centred) rows, W = W₀ + Xcᵀ·A with
    (Xc·Xcᵀ + λI)·A = Tc − Xc·W₀, an N × N system (the push-through identity; with λ = 0, the
    pseudo-inverse's A). The bias, unpenalised, is what centring removed: b = T̄ − X̄·W. λ is `solve_level`'s,
    so both give the same fit up to round-off; a wide Linear level on a few hundred calibration rows
    (9,216 inputs, 200 rows) solves in milliseconds instead of tens of seconds and keeps no d × d matrix."""
    fan_in, groups = x.shape[1], t.shape[1]
    x_mean = x.mean(0) if with_bias else x.new_zeros(fan_in)
    t_mean = t.mean(0) if with_bias else t.new_zeros(groups)
    centred = x - x_mean
    base = prior[:fan_in] if prior is not None else x.new_zeros(fan_in, groups)
    remainder = (t - t_mean) - centred @ base
    gram = centred @ centred.T
    penalty = ridge * (x.square().sum() / fan_in).clamp_min(torch.finfo(torch.float64).tiny)
    coefficients: Tensor | None = None
    if ridge > 0:
        regularised = gram.clone()
        regularised.diagonal().add_(penalty)
        factor, info = torch.linalg.cholesky_ex(regularised)
        if info == 0:
            coefficients = torch.cholesky_solve(remainder, factor)
    if coefficients is None:
        coefficients = _min_norm(gram + penalty * torch.eye(len(gram), dtype=gram.dtype), remainder)
    weight = base + centred.T @ coefficients
    bias = t_mean - x_mean @ weight

    outputs = x @ weight + bias
    spread = (t - t.mean(0)).square().sum()
    residual = (outputs - t).square().sum()
    r2 = float(1 - residual / spread) if spread > 0 else float(residual <= 1e-12 * t.square().sum())
    rank, live = _rank_of_rows(torch.cat([x, x.new_ones(len(x), 1)], dim=1) if with_bias else x)
    return LevelFit(
        weight, bias, r2, outputs.mean(0), outputs.var(0, unbiased=False), rank, live, fan_in + with_bias
    )


def _rank_of_rows(x: Tensor) -> tuple[int, int]:
    """`numerical_rank` of XᵀX from X ``[N, d]`` itself: the columns scaled to unit norm as there, and the
    rank read off the N × N matrix X·Xᵀ, which has the same non-zero eigenvalues."""
    norms = x.square().sum(0)
    alive = _nonzero(norms)
    live = int(alive.sum())
    if not live:
        return 0, 0
    scaled = x[:, alive] * norms[alive].rsqrt()
    return _pivoted_rank(scaled @ scaled.T, RANK_TOLERANCE * x.shape[1]), live


def numerical_rank(gram: Tensor) -> tuple[int, int]:
    """The numerical rank of a Gram matrix XᵀX (how many directions the rows of X span), and how many
    columns of X are not zero throughout.

    Scale-free (the matrix is first normalised to a unit diagonal). The rank is where a Cholesky
    factorisation with complete pivoting (LAPACK's ``dpstrf``) runs out of pivots above the tolerance:
    O(d²·rank), several times cheaper than counting eigenvalues, and the same count wherever the
    spectrum has a clear gap, as it has when the rows are fewer than the inputs or an input is constant.
    """
    normalised, alive = _unit_diagonal(gram)
    live = int(alive.sum())
    if not live:
        return 0, 0
    return _pivoted_rank(normalised, RANK_TOLERANCE * gram.shape[0]), live


def _nonzero(squares: Tensor) -> Tensor:
    """Which inputs are not zero throughout, from their sums of squares ``[..., d]``: those above
    `RANK_TOLERANCE` of the largest (of each matrix in a batch)."""
    largest = squares.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return squares > largest * RANK_TOLERANCE


def _unit_diagonal(gram: Tensor) -> tuple[Tensor, Tensor]:
    """A Gram matrix ``[..., d, d]`` scaled to a unit diagonal (inputs that are zero throughout to zero),
    and which inputs are not (`_nonzero`)."""
    diagonal = gram.diagonal(dim1=-2, dim2=-1)
    alive = _nonzero(diagonal)
    inverse_root = torch.where(alive, diagonal.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), 0.0)
    return gram * inverse_root[..., :, None] * inverse_root[..., None, :], alive


def _pivoted_rank(matrix: Tensor, tolerance: float) -> int:
    """How many pivots of a Cholesky factorisation with complete pivoting exceed ``tolerance``."""
    from scipy.linalg import lapack  # imported on first use: `import fedfuse` stays light

    *_, rank, info = lapack.dpstrf(matrix.cpu().numpy(), lower=1, tol=tolerance)
    if info < 0:
        raise RuntimeError(f"LAPACK dpstrf rejected argument {-info}")
    return int(rank)


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
