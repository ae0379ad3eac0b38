"""The robustness benchmark (simulations/benchmarks/robustness_benchmark.py) in its quick mode: one small
setting, two attacks, FedFuse against one of Flower's robust strategies."""

from __future__ import annotations

import json

import pytest

from simulations.benchmarks import robustness_benchmark


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict:
    output = tmp_path_factory.mktemp("robustness") / "robustness.json"
    robustness_benchmark.main(
        [
            "--partitionings=iid",
            "--settings=6:1",
            "--attacks=gaussian-noise,scale-1e20",
            "--strategies=fedfuse,fedfuse-unscreened,fedmedian",
            "--epochs=8",
            f"--output={output}",
        ]
    )
    return json.loads(output.read_text())


def cell(result: dict, attack: str, strategy: str) -> dict:
    (found,) = [c for c in result["cells"] if c["attack"] == attack and c["strategy"] == strategy]
    return found


def test_screened_fedfuse_names_the_bad_client_and_fuses_exactly_the_honest_ones(quick):
    honest = cell(quick, "honest only", "fedfuse")["accuracy"]
    for attack in ("gaussian-noise", "scale-1e20"):
        result = cell(quick, attack, "fedfuse")
        assert result["status"] == "ok" and result["named"]
        assert result["metrics"]["fusion-screened-out-nodes"] == [105]
        assert result["accuracy"] == honest


def test_without_screening_a_round_that_fails_is_retried_without_the_culprit_and_names_it(quick):
    result = cell(quick, "scale-1e20", "fedfuse-unscreened")
    assert result["status"] == "ok" and result["named"]
    assert result["metrics"]["fusion-failures"] >= 1 and result["metrics"]["fusion-failed-nodes"] == [105]


def test_flowers_own_strategy_runs_on_the_same_replies_and_the_table_and_targets_are_printed(quick):
    assert cell(quick, "gaussian-noise", "fedmedian")["status"] == "ok"
    table = "\n".join(quick["table"])
    assert "iid, 1 bad of 6 clients" in table and "targets (FedFuse with screening)" in table
