"""The harness's figures: accuracy per method, and for sweeps accuracy against alpha and against K.

Every figure shows the mean over seeds, with the standard deviation as error bars or a band. Drawn
with matplotlib's Agg backend (files only, no display needed).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from simulations.one_shot.summary import SummaryRow  # noqa: E402

METHODS_PLOT = "accuracy_by_method.png"
ALPHA_PLOT = "accuracy_vs_alpha.png"
CLIENTS_PLOT = "accuracy_vs_clients.png"
_COLUMNS = 3  # panels per figure row
_TITLE_CHARS_PER_PANEL = 80  # the title is wrapped to fit the figure's width


def plot_methods(summary: Sequence[SummaryRow], path: Path, title: str) -> None:
    """Horizontal bars of every method's mean accuracy (± std over seeds), one panel per sweep point."""
    points = list(dict.fromkeys(row.point for row in summary))
    methods = list(dict.fromkeys(row.method for row in summary))
    figure, axes = _panels(len(points), height=0.3 * len(methods) + 1.2)
    for axis, point in zip(axes, points):
        rows = [row for row in summary if row.point == point]
        axis.barh(
            range(len(rows)),
            [row.accuracy_mean for row in rows],
            xerr=[row.accuracy_std for row in rows],
            color=[_colour(methods, row.method) for row in rows],
        )
        axis.set_yticks(range(len(rows)), [row.method for row in rows])
        axis.invert_yaxis()
        axis.set_xlim(0.0, 1.0)
        axis.set_xlabel("accuracy")
        axis.set_title(_point_label(point))
        axis.grid(axis="x", alpha=0.3)
    _save(figure, path, title)


def plot_sweep(summary: Sequence[SummaryRow], along: str, path: Path, title: str) -> None:
    """Mean accuracy (band: ± std over seeds) of every method against ``along`` (``"alpha"`` or
    ``"num_clients"``), one panel per value of the other sweep options."""
    if along not in ("alpha", "num_clients"):
        raise ValueError(f"plot_sweep draws along 'alpha' or 'num_clients', got {along!r}")
    other = "num_clients" if along == "alpha" else "alpha"
    panels = list(dict.fromkeys((row.init, getattr(row, other)) for row in summary))
    methods = list(dict.fromkeys(row.method for row in summary))
    figure, axes = _panels(len(panels), height=3.6)
    for axis, (init, fixed) in zip(axes, panels):
        for method in methods:
            rows = sorted(
                (r for r in summary if (r.init, getattr(r, other), r.method) == (init, fixed, method)),
                key=lambda r: getattr(r, along),
            )
            x = [getattr(r, along) for r in rows]
            mean = [r.accuracy_mean for r in rows]
            colour = _colour(methods, method)
            axis.plot(x, mean, marker="o", color=colour, label=method)
            axis.fill_between(
                x,
                [m - r.accuracy_std for m, r in zip(mean, rows)],
                [m + r.accuracy_std for m, r in zip(mean, rows)],
                color=colour,
                alpha=0.15,
            )
        if along == "alpha":
            axis.set_xscale("log")  # alpha's effect is multiplicative: 0.1, 0.3, 1.0 are even steps
        values = sorted({getattr(r, along) for r in summary})
        axis.set_xticks(values, [str(value) for value in values])
        axis.minorticks_off()
        axis.set_xlabel("Dirichlet alpha (smaller: more label skew)" if along == "alpha" else "clients K")
        axis.set_ylabel("accuracy")
        axis.set_ylim(0.0, 1.0)
        axis.set_title(f"{init} init, " + (f"K={fixed}" if other == "num_clients" else f"alpha={fixed}"))
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize="small", loc="lower right")
    _save(figure, path, title)


def _panels(count: int, height: float) -> tuple[plt.Figure, list[plt.Axes]]:
    """A figure with ``count`` panels in rows of `_COLUMNS` (unused places hidden)."""
    columns = min(count, _COLUMNS)
    rows = math.ceil(count / columns)
    figure, grid = plt.subplots(rows, columns, figsize=(5.5 * columns, height * rows), squeeze=False)
    axes = list(grid.flat)
    for axis in axes[count:]:
        axis.set_visible(False)
    return figure, axes[:count]


def _colour(methods: list[str], method: str) -> tuple[float, float, float, float]:
    """The same colour for a method in every panel and figure of a run (10 distinct ones, 20 if needed)."""
    palette = "tab10" if len(methods) <= 10 else "tab20"
    return plt.get_cmap(palette)(methods.index(method) % 20)


def _point_label(point: tuple[str, int, float | None]) -> str:
    init, num_clients, alpha = point
    return f"{init} init, K={num_clients}" + ("" if alpha is None else f", alpha={alpha}")


def _save(figure: plt.Figure, path: Path, title: str) -> None:
    columns = figure.axes[0].get_gridspec().ncols
    figure.suptitle(textwrap.fill(title, _TITLE_CHARS_PER_PANEL * columns), fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
