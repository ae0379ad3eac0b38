"""The harness's printed output: a one-line summary of the setting above every table, the clients' label
histogram, one table per setting, and a sweep's table over seeds."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from simulations.one_shot.methods import Row
from simulations.one_shot.setting import PARTITIONING_NAMES, Setting
from simulations.one_shot.summary import SummaryRow
from simulations.one_shot.sweep import SettingResult

LEGEND = (
    "fusion s: seconds to merge the client models into one; ensembles: all K client models at inference "
    "(K times the cost), class-weighted and stacked ones measured on the calibration set like FedFuse"
)


def setting_line(setting: Setting, evaluation_size: int) -> str:
    """The one-line summary of a setting: data, clients, partitioning, init, model, sets and seed."""
    return (
        f"{setting.dataset}: {setting.num_clients} clients, {setting.partitioning_label}, "
        f"{setting.init} init, {setting.model_label}, {setting.epochs} local epochs, "
        f"calibration {setting.calibration_size} (class-balanced, server only), "
        f"evaluation {evaluation_size}, seed {setting.seed}"
    )


def sweep_line(results: Sequence[SettingResult]) -> str:
    """The one-line summary of a sweep: what is common, and the values each swept option took."""
    first = results[0].setting
    settings = [result.setting for result in results]
    partitioning = (
        f"{PARTITIONING_NAMES[first.partitioning]}(alpha {_values(s.alpha for s in settings)})"
        if first.alpha is not None
        else first.partitioning_label
    )
    return (
        f"{first.dataset}: clients {_values(s.num_clients for s in settings)}, {partitioning}, "
        f"init {_values(s.init for s in settings)}, {first.model_label}, {first.epochs} local epochs, "
        f"calibration {first.calibration_size} (class-balanced, server only), "
        f"evaluation {_values(r.evaluation_size for r in results)}, seeds {_values(s.seed for s in settings)}"
    )


def setting_report(result: SettingResult, fusion_weights: str) -> str:
    """Everything printed for one setting: its line, the label histogram, the table and the timings."""
    return "\n".join(
        [
            setting_line(result.setting, result.evaluation_size),
            histogram_table(result.label_counts),
            rows_table(result.comparison.rows),
            f"{LEGEND}; FedFuse weights the clients by {_weights_words(fusion_weights)}",
            f"Flower run {result.flower_seconds:.1f} s (start-up included), setting {result.seconds:.1f} s",
        ]
    )


def histogram_table(label_counts: np.ndarray) -> str:
    """Label counts per client [K, C], one row each, with the client's size."""
    width = max(len(str(int(label_counts.max()))), 3)
    header = "labels    " + " ".join(f"{c:>{width}}" for c in range(label_counts.shape[1])) + "      n"
    rows = [
        f"client {k:<2} " + " ".join(f"{int(n):>{width}}" for n in counts) + f" {int(counts.sum()):>6}"
        for k, counts in enumerate(label_counts)
    ]
    return "\n".join([header, *rows])


def rows_table(rows: Sequence[Row]) -> str:
    """One setting's methods: accuracy, macro-F1 and merge seconds."""
    width = max(len("method"), *(len(row.method) for row in rows))
    lines = [f"{'method':<{width}}  {'accuracy':>8}  {'macro-F1':>8}  {'fusion s':>8}"]
    lines += [
        f"{row.method:<{width}}  {row.accuracy:>8.4f}  {row.macro_f1:>8.4f}  "
        f"{_seconds(row.fusion_seconds):>8}"
        for row in rows
    ]
    return "\n".join(lines)


def summary_table(summary: Sequence[SummaryRow]) -> str:
    """A sweep's methods at every point: mean ± standard deviation over seeds."""
    width = max(len("method"), *(len(row.method) for row in summary))
    lines = [
        f"{'init':<11}  {'K':>3}  {'alpha':>5}  {'method':<{width}}  {'accuracy':>15}  {'macro-F1':>15}  "
        f"{'fusion s':>8}"
    ]
    lines += [
        f"{row.init:<11}  {row.num_clients:>3}  {_alpha(row.alpha):>5}  {row.method:<{width}}  "
        f"{row.accuracy_mean:.4f} ± {row.accuracy_std:.4f}  "
        f"{row.macro_f1_mean:.4f} ± {row.macro_f1_std:.4f}  {_seconds(row.fusion_seconds_mean):>8}"
        for row in summary
    ]
    return "\n".join(lines)


def _values(values: object) -> str:
    """Distinct values in first-seen order, comma-separated."""
    return ", ".join(str(value) for value in dict.fromkeys(values))


def _weights_words(fusion_weights: str) -> str:
    return {
        "calibration": "what the server measures on its calibration set (nothing disclosed)",
        "labels": "their per-class label counts",
        "examples": "their example counts",
    }[fusion_weights]


def _seconds(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds:.2f}"


def _alpha(alpha: float | None) -> str:
    return "-" if alpha is None else str(alpha)
