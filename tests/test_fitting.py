"""One level's least-squares fit from accumulated statistics (`fedfuse.fusion.fitting.solve_level`)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from fedfuse.fusion.fitting import solve_channels, solve_level
from fedfuse.fusion.statistics import ChannelStatistics, LevelStatistics


def _problem(rows: int, inputs: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, inputs, generator=generator, dtype=torch.float64)
    t = x @ torch.randn(inputs, 4, generator=generator, dtype=torch.float64)
    t += 0.3 * torch.randn(rows, 4, generator=generator, dtype=torch.float64)
    prior = torch.randn(inputs + 1, 4, generator=generator, dtype=torch.float64)
    return x, t, prior


def _statistics(x: Tensor, t: Tensor, split: int) -> LevelStatistics:
    stats = LevelStatistics(x.shape[1], t.shape[1], torch.device("cpu"))
    stats.add(x[:split], t[:split])
    stats.add(x[split:], t[split:])
    return stats


def _normal_equations(x: Tensor, t: Tensor, prior: Tensor, ridge: float, with_bias: bool) -> Tensor:
    """The reference: (XcᵀXc + λI)·W = XcᵀTc + λ·W₀, λ = ridge · mean diagonal of XᵀX, Xc centred when
    the (unpenalised) bias is fitted."""
    xc, tc = (x - x.mean(0), t - t.mean(0)) if with_bias else (x, t)
    penalty = ridge * x.square().sum(0).mean()
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    return torch.linalg.solve(xc.T @ xc + penalty * eye, xc.T @ tc + penalty * prior[: x.shape[1]])


@pytest.mark.parametrize("rows", [120, 12])
@pytest.mark.parametrize("ridge", [0.0, 0.01, 10.0])
def test_the_fit_reports_the_explained_share_and_output_spread_of_its_own_solution(
    ridge: float, rows: int
) -> None:
    x, t, prior = _problem(rows, 15)
    stats = _statistics(x, t, split=rows // 2)

    fit = solve_level(stats, ridge, with_bias=True, prior=prior)

    outputs = x @ fit.weight + fit.bias
    explained = 1 - (outputs - t).square().sum() / (t - t.mean(0)).square().sum()
    assert fit.r2 == pytest.approx(float(explained), abs=1e-9)
    torch.testing.assert_close(fit.output_mean, outputs.mean(0))
    torch.testing.assert_close(fit.output_var, outputs.var(0, unbiased=False))
    assert fit.rank == min(rows, 16) and fit.live == fit.fan_in == 16
    if ridge == 10.0:  # pulled toward the prior: explains less than the free fit does
        assert fit.r2 < solve_level(stats, 0.0, with_bias=True, prior=prior).r2 - 0.01


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("ridge", [0.01, 10.0])
@pytest.mark.parametrize(("rows", "split"), [(30, 15), (70, 30)])
def test_the_fit_solves_the_normal_equations_whether_it_kept_the_rows_or_summed_them(
    rows: int, split: int, ridge: float, with_bias: bool
) -> None:
    """30 rows of 50 inputs are kept and solved in their span; 70 are summed into XᵀX (the 30 kept
    before the 40 more arrive are summed too): either way the solution is the normal equations'."""
    x, t, prior = _problem(rows, 50)
    stats = _statistics(x, t, split)
    assert (stats.kept_rows is not None) == (rows <= 50)

    fit = solve_level(stats, ridge, with_bias=with_bias, prior=prior if with_bias else prior[:50])

    expected = _normal_equations(x, t, prior, ridge, with_bias)
    torch.testing.assert_close(fit.weight, expected, rtol=1e-7, atol=1e-9)
    bias = t.mean(0) - x.mean(0) @ expected if with_bias else torch.zeros(4, dtype=x.dtype)
    torch.testing.assert_close(fit.bias, bias, rtol=1e-7, atol=1e-9)


def test_with_fewer_rows_than_inputs_and_no_ridge_the_fit_is_exact_and_the_nearest_to_its_prior() -> None:
    x, t, prior = _problem(20, 50)
    fit = solve_level(_statistics(x, t, 10), 0.0, with_bias=True, prior=prior)

    torch.testing.assert_close(x @ fit.weight + fit.bias, t)
    # Nearest the prior: what it changed lies in the span of the centred rows.
    centred = x - x.mean(0)
    change = fit.weight - prior[:50]
    in_span = centred.T @ torch.linalg.lstsq(centred.T, change).solution
    torch.testing.assert_close(change, in_span)
    assert fit.rank == 20 and fit.live == 51


@pytest.mark.parametrize("ridge", [0.0, 0.01, 10.0])
def test_a_depthwise_layer_solves_each_channels_normal_equations_on_its_own_channel(ridge: float) -> None:
    """Channel c's filter is fitted to channel c's target from channel c's patches alone, pulled toward its
    own prior with λ scaled to that channel's inputs (5 channels of 9 taps, the last channel's inputs
    100 times larger)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, 9, generator=generator, dtype=torch.float64)
    x[:, -1] *= 100
    t = torch.einsum("rck,ck->rc", x, torch.randn(5, 9, generator=generator, dtype=torch.float64))
    t += torch.randn(200, 5, generator=generator, dtype=torch.float64)
    prior = torch.randn(10, 5, generator=generator, dtype=torch.float64)
    stats = ChannelStatistics(5, 9, torch.device("cpu"))
    stats.add(x[:120], t[:120])
    stats.add(x[120:], t[120:])

    fit = solve_channels(stats, ridge, with_bias=True, prior=prior)

    for channel in range(5):
        expected = _normal_equations(
            x[:, channel], t[:, channel : channel + 1], prior[:, channel : channel + 1], ridge, True
        )
        torch.testing.assert_close(fit.weight[:, channel : channel + 1], expected)
    outputs = torch.einsum("rck,kc->rc", x, fit.weight) + fit.bias
    torch.testing.assert_close(fit.bias, (t - torch.einsum("rck,kc->rc", x, fit.weight)).mean(0))
    torch.testing.assert_close(fit.output_mean, outputs.mean(0))
    torch.testing.assert_close(fit.output_var, outputs.var(0, unbiased=False))
    explained = 1 - (outputs - t).square().sum() / (t - t.mean(0)).square().sum()
    assert fit.r2 == pytest.approx(float(explained), abs=1e-9)
    assert (fit.rank, fit.live, fit.fan_in) == (50, 50, 10)
