"""The peer benchmark: its default grid is the issue's full one, its table says where FedFuse stands against
the best peer method, and one tiny run end to end gives every method's row, the JSON and the plot."""

from __future__ import annotations

import json

import pytest

from simulations.baselines import PEER_METHODS
from simulations.benchmarks.peer_benchmark import FEDFUSE, build_parser, main, markdown, settings_of
from simulations.one_shot.cli import build_parser as harness_parser
from simulations.one_shot.cli import plan
from simulations.one_shot.summary import SummaryRow


def test_the_default_grid_is_both_models_every_k_alpha_init_and_three_seeds() -> None:
    settings = settings_of(build_parser().parse_args([]))
    assert len(settings) == 2 * 2 * 3 * 2 * 3
    assert {s.model for s in settings} == {"cnn", "vgg11"}
    assert {s.num_clients for s in settings} == {2, 4, 8}
    assert {s.alpha for s in settings} == {0.1, 0.5}
    assert {s.init for s in settings} == {"independent", "shared"}
    assert {s.seed for s in settings} == {0, 1, 2}
    assert {s.dataset for s in settings} == {"mnist"}
    assert {(s.model, s.width_multiplier) for s in settings} == {("cnn", None), ("vgg11", 0.25)}


def test_vgg11s_width_is_a_flag_and_part_of_the_setting_the_tables_name() -> None:
    args = build_parser().parse_args(["--models", "vgg11-bn", "--width-multiplier", "0.5", "--seeds", "1"])
    assert {s.model_label for s in settings_of(args)} == {"vgg11-bn (width 0.5)"}


def test_flags_select_a_subset() -> None:
    args = build_parser().parse_args(["--models", "cnn", "--clients", "2,4", "--seeds", "1"])
    assert len(settings_of(args)) == 2 * 2 * 2


def row(method: str, accuracy: float) -> SummaryRow:
    return SummaryRow("shared", 2, 0.5, method, 2, accuracy, 0.01, accuracy, 0.01, 1.0)


def test_the_table_gives_fedfuse_minus_the_best_peer() -> None:
    rows = [("cnn", row(FEDFUSE, 0.80)), ("cnn", row("regmean", 0.85)), ("cnn", row("git-rebasin", 0.5))]
    setting = {
        "command": "c",
        "dataset": "mnist",
        "data_dir": "d",
        "models": ["cnn"],
        "epochs": 1,
        "calibration_size": 200,
        "evaluation_size": 10,
        "seeds": [0, 1],
        "fedfuse": "defaults",
        "machine": "m",
        "seconds": 1.0,
    }
    table = markdown(setting, rows)
    assert "d), cnn, Dirichlet label skew" in table
    assert "| **fedfuse linear uniform** | 0.800 ± 0.010 | 1.00 |" in table
    assert "| FedFuse − best peer | -0.050 (regmean) | |" in table


def test_the_harness_takes_the_peer_methods_by_name() -> None:
    _, options = plan(harness_parser().parse_args(["--methods", "ot-fusion,flwr-krum"]))
    assert options.peers == ("ot-fusion", "flwr-krum")
    with pytest.raises(ValueError, match="--methods: unknown \\['fedma'\\]"):
        plan(harness_parser().parse_args(["--methods", "fedma"]))


@pytest.mark.slow
def test_a_tiny_run_reports_every_method_with_its_setting(tmp_path) -> None:
    document = main(
        ["--dataset", "digits", "--models", "mlp", "--clients", "2", "--alpha", "0.5", "--init", "shared"]
        + ["--seeds", "1", "--epochs", "1", "--output-dir", str(tmp_path)]
    )
    methods = {r["method"] for r in document["rows"]}
    assert {FEDFUSE, *PEER_METHODS} <= methods
    assert all(r["fusion_seconds_mean"] is not None for r in document["rows"] if r["method"] in PEER_METHODS)
    assert json.loads((tmp_path / "peers.json").read_text())["setting"]["seeds"] == [0]
    assert "FedFuse − best peer" in (tmp_path / "peers.md").read_text()
    assert (tmp_path / "peers.png").stat().st_size > 0
