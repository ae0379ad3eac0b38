"""What the harness prints and writes, from made-up results (no training): tables, summary over seeds,
JSON, CSV and plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from simulations.one_shot.methods import Comparison, MethodOptions, Row
from simulations.one_shot.outputs import results_document, write_csv, write_json
from simulations.one_shot.plots import plot_methods, plot_sweep
from simulations.one_shot.report import histogram_table, rows_table, setting_report, summary_table, sweep_line
from simulations.one_shot.setting import Setting
from simulations.one_shot.summary import summarize
from simulations.one_shot.sweep import SettingResult

PNG = b"\x89PNG\r\n\x1a\n"
OPTIONS = MethodOptions(variants=("linear",), importances=("uniform",))


def result(seed: int, alpha: float, num_clients: int, fedfuse: float) -> SettingResult:
    """A made-up setting result with two clients' rows and three merged methods."""
    rows = [
        Row("client 0", 0.5, 0.4, 1.5, client=0),
        Row("client 1", 0.7, 0.6, 1.0, client=1),
        Row("best client", 0.7, 0.6, 1.0),
        Row("fedavg one-shot", 0.2, 0.1, 2.0, fusion_seconds=0.01),
        Row("fedfuse linear uniform", fedfuse, fedfuse - 0.05, 0.3, fusion_seconds=0.5 + seed),
        Row("ensemble", 0.75, 0.7, 0.8),
    ]
    return SettingResult(
        setting=Setting(seed=seed, alpha=alpha, num_clients=num_clients, init="independent"),
        evaluation_size=359,
        label_counts=np.array([[12, 0, 3], [1, 40, 7]]),
        comparison=Comparison(rows, {"fedfuse linear uniform": {"parents": num_clients}}),
        flower_seconds=9.5,
        seconds=12.25,
    )


SWEEP = [
    result(seed, alpha, k, fedfuse=0.8 + 0.1 * seed)
    for k in (2, 4)
    for alpha in (0.1, 1.0)
    for seed in (0, 1)
]


def test_the_summary_gives_mean_and_spread_over_seeds_and_leaves_single_clients_out() -> None:
    summary = summarize(SWEEP)
    assert len(summary) == 4 * 4  # four points of the sweep, four methods each (no "client k")
    fedfuse = next(row for row in summary if row.point == ("independent", 4, 1.0) and "fedfuse" in row.method)
    assert fedfuse.seeds == 2
    assert fedfuse.accuracy_mean == pytest.approx(0.85)
    assert fedfuse.accuracy_std == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert fedfuse.fusion_seconds_mean == pytest.approx(1.0)
    ensemble = next(row for row in summary if row.method == "ensemble")
    assert ensemble.accuracy_std == 0.0 and ensemble.fusion_seconds_mean is None


def test_a_single_seed_has_no_spread() -> None:
    assert all(row.accuracy_std == 0.0 for row in summarize(SWEEP[:1]))


def test_every_table_has_its_one_line_summary_above_it() -> None:
    printed = setting_report(SWEEP[0], "labels")
    lines = printed.splitlines()
    assert lines[0] == (
        "digits: 2 clients, Dirichlet(alpha=0.1), independent init, mlp, 20 local epochs, calibration 200 "
        "(class-balanced, server only), evaluation 359, seed 0"
    )
    assert lines[1].split() == ["labels", "0", "1", "2", "n"]
    assert lines[3].split() == ["client", "1", "1", "40", "7", "48"]
    assert "per-class label counts" in printed and "Flower run 9.5 s" in printed
    assert sweep_line(SWEEP) == (
        "digits: clients 2, 4, Dirichlet(alpha 0.1, 1.0), init independent, mlp, 20 local epochs, "
        "calibration 200 (class-balanced, server only), evaluation 359, seeds 0, 1"
    )


def test_tables_show_scores_and_merge_seconds_only_where_something_was_merged() -> None:
    table = rows_table(SWEEP[1].comparison.rows).splitlines()
    assert table[0].split() == "method accuracy macro-F1 fusion s".split()
    assert table[4].split() == "fedavg one-shot 0.2000 0.1000 0.01".split()
    assert table[6].split() == "ensemble 0.7500 0.7000".split()
    summary = summary_table(summarize(SWEEP)).splitlines()
    assert summary[0].split() == "init K alpha method accuracy macro-F1 fusion s".split()
    assert (
        summary[3].split()
        == "independent 2 0.1 fedfuse linear uniform 0.8500 ± 0.0707 0.8000 ± 0.0707 1.00".split()
    )
    histogram = histogram_table(np.array([[3, 0], [10, 200]])).splitlines()
    assert histogram[2].split() == "client 1 10 200 210".split()


def test_json_and_csv_hold_every_row_of_every_setting(tmp_path: Path) -> None:
    document = results_document(SWEEP, summarize(SWEEP), OPTIONS, "python -m simulations.one_shot", 60.0)
    written = json.loads(write_json(tmp_path, document).read_text())
    assert written == json.loads(json.dumps(document))
    assert len(written["settings"]) == 8 and written["settings"][0]["label_counts"] == [
        [12, 0, 3],
        [1, 40, 7],
    ]
    assert written["settings"][0]["setting"]["alpha"] == 0.1 and written["options"]["importances"] == [
        "uniform"
    ]

    with write_csv(tmp_path, SWEEP).open() as file:
        header = next(csv.reader(file))
        file.seek(0)
        lines = list(csv.DictReader(file))
    assert len(header) == len(set(header)), "a column repeats"
    assert {line["evaluation_size"] for line in lines} == {str(SWEEP[0].evaluation_size)}
    assert len(lines) == 8 * 6
    assert lines[4]["method"] == "fedfuse linear uniform" and lines[4]["num_clients"] == "2"
    assert lines[4]["fusion_seconds"] == "0.5" and lines[0]["client"] == "0" and lines[2]["client"] == ""


def test_plots_are_written_for_methods_and_along_each_swept_option(tmp_path: Path) -> None:
    summary = summarize(SWEEP)
    plot_methods(summary, tmp_path / "methods.png", "title")
    plot_sweep(summary, "alpha", tmp_path / "alpha.png", "title")
    plot_sweep(summary, "num_clients", tmp_path / "clients.png", "title")
    for name in ("methods.png", "alpha.png", "clients.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG)
    with pytest.raises(ValueError, match="'alpha' or 'num_clients'"):
        plot_sweep(summary, "seed", tmp_path / "seed.png", "title")
