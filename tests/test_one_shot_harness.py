"""The harness end to end on digits with small settings: real Flower simulations, every method, every file.

One setting runs alone; then a 2 x 2 sweep (clients x alpha) that contains the same setting, which must
come out the same (same seed, same result). About 15 s of Flower start-up per setting on two cores.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import pytest

from fedfuse.fusion.config import VARIANTS
from simulations.baselines import ENSEMBLES
from simulations.one_shot.cli import main

SMALL = [
    "--init", "independent", "--epochs", "10", "--fedavg-rounds", "2",
    "--calibration-size", "150", "--evaluation-size", "300", "--no-progress", "--polish-epochs", "3",
    "--output-targets", "labels,auto",
]  # fmt: skip
PNG = b"\x89PNG\r\n\x1a\n"


def run(argv: list[str], output: Path) -> tuple[dict, str]:
    """The harness's returned document and everything it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        document = main([*argv, "--output-dir", str(output)])
    return document, printed.getvalue()


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    output = tmp_path_factory.mktemp("single")
    return *run([*SMALL, "--clients", "3", "--alpha", "0.3"], output), output


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    output = tmp_path_factory.mktemp("sweep")
    return *run([*SMALL, "--clients", "2,3", "--alpha", "0.3,1.0"], output), output


@pytest.mark.slow
def test_one_setting_scores_every_method_on_the_same_client_models(single) -> None:
    document, _, _ = single
    (setting,) = document["settings"]
    rows = {row["method"]: row for row in setting["rows"]}
    assert list(rows) == [
        "client 0", "client 1", "client 2", "best client", "mean client", "fedavg one-shot",
        *(
            f"fedfuse {variant} uniform{target}{polished}"
            for variant in VARIANTS
            for target in ("", " auto")
            for polished in ("", " polished")
        ),
        *ENSEMBLES, "best ensemble",
        "fedavg 2 rounds", "central",
    ]  # fmt: skip
    assert rows["best client"]["accuracy"] == max(rows[f"client {k}"]["accuracy"] for k in range(3))
    assert rows["best ensemble"]["accuracy"] == max(rows[name]["accuracy"] for name in ENSEMBLES)
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["macro_f1"] <= 1.0
        merged = row["method"].startswith(("fedavg one-shot", "fedfuse"))
        assert (row["fusion_seconds"] is not None) == merged
    # Clients that started from independent inits: averaging collapses, fusion does not.
    assert rows["fedavg one-shot"]["accuracy"] < 0.5
    assert rows["fedfuse linear uniform"]["accuracy"] > rows["fedavg one-shot"]["accuracy"] + 0.3
    assert rows["fedfuse linear uniform"]["accuracy"] > 0.8
    assert rows["fedavg 2 rounds"]["accuracy"] > 0.5 and rows["central"]["accuracy"] > 0.9  # chance: 0.1
    assert setting["fusion_reports"]["fedfuse linear uniform"]["parents"] == 3
    assert setting["fusion_reports"]["fedfuse linear uniform polished"]["config"]["polish_epochs"] == 3
    assert setting["fusion_reports"]["fedfuse linear uniform"]["config"]["polish_epochs"] == 0
    auto = setting["fusion_reports"]["fedfuse linear uniform auto"]
    assert auto["config"]["output_target"] == "auto" and auto["levels"][-1]["output_target"] is not None
    counts = setting["label_counts"]
    assert len(counts) == 3 and sum(map(sum, counts)) == 1797 - 150 - 300
    assert setting["flower_seconds"] < setting["seconds"]


@pytest.mark.slow
def test_one_setting_prints_its_summary_histogram_and_table_and_writes_json_csv_and_a_plot(single) -> None:
    document, printed, output = single
    lines = printed.splitlines()
    assert lines[0].startswith(
        "digits: 3 clients, Dirichlet(alpha=0.3), independent init, mlp, 10 local epochs"
    )
    assert lines[1].split()[0] == "labels" and lines[4].startswith("client 2")
    assert any(line.startswith("fedfuse linear uniform") for line in lines)
    assert json.loads((output / "results.json").read_text()) == json.loads(json.dumps(document))
    with (output / "results.csv").open() as file:
        assert len(list(csv.DictReader(file))) == len(document["settings"][0]["rows"])
    assert (output / "accuracy_by_method.png").read_bytes().startswith(PNG)
    assert not (output / "accuracy_vs_alpha.png").exists()  # nothing was swept


@pytest.mark.slow
def test_a_sweep_ends_with_one_table_over_all_settings_and_plots_along_alpha_and_clients(sweep) -> None:
    document, printed, output = sweep
    points = [(s["setting"]["num_clients"], s["setting"]["alpha"]) for s in document["settings"]]
    assert points == [(2, 0.3), (2, 1.0), (3, 0.3), (3, 1.0)]
    assert printed.count("digits: 2 clients") == 2 and printed.count("digits: 3 clients") == 2
    closing = printed[printed.index("digits: clients 2, 3") :]
    assert closing.splitlines()[1].split()[:4] == ["init", "K", "alpha", "method"]
    assert len({(row["num_clients"], row["alpha"]) for row in document["summary"]}) == 4
    for name in ("accuracy_by_method.png", "accuracy_vs_alpha.png", "accuracy_vs_clients.png"):
        assert (output / name).read_bytes().startswith(PNG)


@pytest.mark.slow
def test_the_same_setting_gives_the_same_results_run_alone_or_in_a_sweep(single, sweep) -> None:
    def scores(setting: dict) -> list[tuple]:
        return [(row["method"], row["accuracy"], row["macro_f1"], row["loss"]) for row in setting["rows"]]

    alone = single[0]["settings"][0]
    in_sweep = next(s for s in sweep[0]["settings"] if s["setting"] == alone["setting"])
    assert scores(in_sweep) == scores(alone)
    assert in_sweep["label_counts"] == alone["label_counts"]
