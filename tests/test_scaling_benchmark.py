"""The scaling benchmark measures what it says, on the embedded digits."""

from __future__ import annotations

import pytest

from simulations.benchmarks.scaling_benchmark import growth_exponent, main


def test_growth_exponent_is_the_log_log_slope_from_k_8() -> None:
    rows = [{"parents": k, "seconds": 0.5 * k**1.5} for k in (2, 4, 8, 16, 32)]
    rows[0]["seconds"] = 100.0  # below K = 8: left out of the fit
    assert growth_exponent(rows) == pytest.approx(1.5)
    assert growth_exponent(rows[:3]) is None


def test_the_benchmark_reports_seconds_memory_accuracy_and_limit_ratio_for_every_k_and_init() -> None:
    document = main(
        [
            "--dataset",
            "digits",
            "--models",
            "mlp",
            "--parents",
            "2,3",
            "--hidden",
            "16",
            "--calibration-sizes",
            "60,30",
            "--samples-per-parent",
            "100",
            "--evaluation-size",
            "200",
            "--repeats",
            "2",
        ]
    )
    rows = document["rows"]
    assert {(r["parents"], r["init"], r["sweep"]) for r in rows} >= {
        (2, "k-means++", "K"),
        (3, "reference", "K"),
        (3, "k-means++", "calibration size"),
    }
    for row in rows:
        assert row["seconds"] > 0 and row["pass_seconds"] > 0
        assert row["limit_ratio"] == pytest.approx(row["seconds"] / row["pass_seconds"])
        assert row["repeats"] == 2 and row["seconds_median"] >= row["seconds"]
        assert 0.3 < row["accuracy"] <= 1.0  # fused digits MLPs beat chance (0.1) by far
        assert row["peak_mb"] is None or row["peak_mb"] <= row["stated_mb"]  # docs/fusion.md's promise
        assert row["stated_mb"] == pytest.approx(
            sum(v for k, v in row["stated_terms_mb"].items() if k != "total")
        )
    assert document["machine"]["cpus"] and document["setting"]["seed"] == 0
