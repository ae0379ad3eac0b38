"""A sweep's results summarised over seeds: mean and spread of every method at every point of the sweep."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from simulations.one_shot.sweep import SettingResult


@dataclass(frozen=True)
class SummaryRow:
    """One method at one point of the sweep, over the seeds run there.

    Attributes:
        init, num_clients, alpha: the point of the sweep (``alpha`` None for partitionings without one).
        method: the method's name; single clients are left out (they differ from seed to seed: the
            ``best client`` and ``mean client`` rows summarise them).
        seeds: how many seeds the means are over.
        accuracy_mean, accuracy_std, macro_f1_mean, macro_f1_std: over seeds; the standard deviation
            is the sample one (n - 1), 0 for a single seed.
        fusion_seconds_mean: mean merge time; None for methods that merge nothing.
    """

    init: str
    num_clients: int
    alpha: float | None
    method: str
    seeds: int
    accuracy_mean: float
    accuracy_std: float
    macro_f1_mean: float
    macro_f1_std: float
    fusion_seconds_mean: float | None

    @property
    def point(self) -> tuple[str, int, float | None]:
        """(init, num_clients, alpha): the point of the sweep this row belongs to."""
        return self.init, self.num_clients, self.alpha


def summarize(results: Sequence[SettingResult]) -> list[SummaryRow]:
    """One `SummaryRow` per (init, K, alpha, method), in the order the results first show them."""
    groups: dict[tuple[str, int, float | None, str], list] = {}
    for result in results:
        setting = result.setting
        for row in result.comparison.rows:
            if row.client is None:
                groups.setdefault((setting.init, setting.num_clients, setting.alpha, row.method), []).append(
                    row
                )
    summary = []
    for (init, num_clients, alpha, method), rows in groups.items():
        seconds = [row.fusion_seconds for row in rows if row.fusion_seconds is not None]
        summary.append(
            SummaryRow(
                init=init,
                num_clients=num_clients,
                alpha=alpha,
                method=method,
                seeds=len(rows),
                accuracy_mean=statistics.mean(row.accuracy for row in rows),
                accuracy_std=_spread([row.accuracy for row in rows]),
                macro_f1_mean=statistics.mean(row.macro_f1 for row in rows),
                macro_f1_std=_spread([row.macro_f1 for row in rows]),
                fusion_seconds_mean=statistics.mean(seconds) if seconds else None,
            )
        )
    return summary


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0
