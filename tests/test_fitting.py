"""One level's least-squares fit from accumulated statistics (`fedfuse.fusion.fitting.solve_level`)."""

from __future__ import annotations

import pytest
import torch

from fedfuse.fusion.fitting import solve_level
from fedfuse.fusion.statistics import LevelStatistics


@pytest.mark.parametrize("ridge", [0.0, 0.01, 10.0])
def test_the_fit_reports_the_explained_share_and_output_spread_of_its_own_solution(ridge: float) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(120, 15, generator=generator, dtype=torch.float64)
    t = x @ torch.randn(15, 4, generator=generator, dtype=torch.float64)
    t += 0.3 * torch.randn(120, 4, generator=generator, dtype=torch.float64)
    prior = torch.randn(16, 4, generator=generator, dtype=torch.float64)
    stats = LevelStatistics(15, 4, torch.device("cpu"))
    stats.add(x[:70], t[:70])
    stats.add(x[70:], t[70:])

    fit = solve_level(stats, ridge, with_bias=True, prior=prior)

    outputs = x @ fit.weight + fit.bias
    explained = 1 - (outputs - t).square().sum() / (t - t.mean(0)).square().sum()
    assert fit.r2 == pytest.approx(float(explained), abs=1e-9)
    torch.testing.assert_close(fit.output_mean, outputs.mean(0))
    torch.testing.assert_close(fit.output_var, outputs.var(0, unbiased=False))
    if ridge == 10.0:  # pulled toward the prior: explains less than the free fit does
        assert fit.r2 < solve_level(stats, 0.0, with_bias=True, prior=prior).r2 - 0.01
