"""The digits fusion demo, end to end on a small setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations.fuse_digits import RESULTS_FILE, main

SMALL = [
    "--clients",
    "3",
    "--epochs",
    "10",
    "--calibration-size",
    "200",
    "--evaluation-size",
    "300",
    "--no-progress",
]


def test_demo_writes_sane_results_and_fusion_beats_averaging_of_independent_inits(tmp_path: Path) -> None:
    returned = main([*SMALL, "--output-dir", str(tmp_path)])
    written = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert written == json.loads(json.dumps(returned))

    assert written["setting"]["clients"] == 3 and written["setting"]["init"] == "independent"
    histogram = written["label_histogram"]
    assert len(histogram) == 3 and all(len(row) == 10 for row in histogram)
    assert sum(map(sum, histogram)) == 1797 - 200 - 300

    rows = {row["method"]: row for row in written["results"]}
    assert list(rows) == ["client 0", "client 1", "client 2", "averaging", "fedfuse", "ensemble"]
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["macro_f1"] <= 1.0 and row["seconds"] >= 0.0
    assert rows["ensemble"]["accuracy"] > 0.5 and rows["fedfuse"]["accuracy"] > 0.5
    assert rows["fedfuse"]["accuracy"] > rows["averaging"]["accuracy"] + 0.2

    report = written["fusion_report"]
    assert report["parents"] == 3 and report["calibration_samples"] == 200
    assert [level["kind"] for level in report["levels"]] == ["linear", "linear", "linear"]


def test_demo_is_reproducible_for_a_seed() -> None:
    def accuracies() -> list[float]:
        return [
            row["accuracy"]
            for row in main([*SMALL, "--model", "cnn-bn", "--epochs", "2", "--seed", "3"])["results"]
        ]

    assert accuracies() == accuracies()


def test_demo_rejects_an_unknown_model() -> None:
    with pytest.raises(SystemExit):
        main(["--model", "resnet"])
