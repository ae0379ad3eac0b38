"""The Flower app under simulations/flower_app: its config, its data split, and real `flwr run` simulations.

The end-to-end tests run the README's command (``flwr run simulations/flower_app --federation-config
"num-supernodes=5" --stream``) against a simulation SuperLink this module starts on a free port in a
temporary FLWR_HOME, offline, and stops by PID afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tomli
import torch
from fedfuse_app.server_app import build_strategy, trained_rounds
from fedfuse_app.task import RunSettings, client_partition, model_factory, split_for
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import FedAvg, Result

from fedfuse import FedFuse
from simulations.flower_processes import APP_DIR, flwr_run, simulation_superlink
from simulations.training import evaluate

REPO = APP_DIR.parents[1]
FLWR_RUN_TIMEOUT = 300  # seconds; a healthy run takes about 30 on two cores


def app_config(**overrides: object) -> dict[str, object]:
    """The app's ``[tool.flwr.app.config]`` (its defaults), with overrides as ``-c`` would give them."""
    config = tomli.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    for key, value in overrides.items():
        assert key in config, f"no config key {key!r}"
        config[key] = value
    return config


# --- settings ------------------------------------------------------------------------------------------


def test_the_apps_defaults_are_a_one_shot_fedfuse_run_on_the_embedded_digits():
    settings = RunSettings.from_run_config(app_config())
    assert (settings.strategy, settings.num_server_rounds, settings.dataset) == ("fedfuse", 1, "digits")
    assert settings.partitioning == "iid"
    assert not settings.send_label_counts  # opt-in


def test_fusion_options_reach_the_fusion_config():
    settings = RunSettings.from_run_config(
        app_config(
            **{
                "fusion-variant": "gradient",
                "fusion-grouping": "hungarian",
                "fusion-importance": "conductance",
                "fusion-ridge": 0.01,
            }
        )
    )
    config = settings.fusion_config()
    assert (config.variant, config.grouping, config.importance, config.ridge, config.seed) == (
        "gradient",
        "hungarian",
        "conductance",
        0.01,
        0,
    )


def test_an_int_is_accepted_for_a_float_key_as_the_command_line_gives_it():
    settings = RunSettings.from_run_config(app_config(**{"dirichlet-alpha": 1, "fusion-timeout": 60}))
    assert settings.dirichlet_alpha == 1.0 and isinstance(settings.dirichlet_alpha, float)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"local-epochs": "ten"}, "'local-epochs' must be a int"),
        ({"send-label-counts": 1}, "'send-label-counts' must be a bool"),
        ({"strategy": "fedprox"}, "'strategy' must be one of 'fedfuse', 'fedavg'"),
        ({"partitioning": "shards"}, "'partitioning' must be one of"),
        ({"output-dir": "outputs/run"}, "'output-dir' must be an absolute path"),
        ({"num-server-rounds": 0}, "'num-server-rounds'"),
    ],
)
def test_a_bad_config_value_is_refused_naming_its_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        RunSettings.from_run_config(app_config(**overrides))


def test_a_missing_config_key_is_refused_naming_it():
    config = app_config()
    del config["calibration-size"]
    with pytest.raises(ValueError, match="misses 'calibration-size'"):
        RunSettings.from_run_config(config)


# --- the data split: the server's sets never reach a client ----------------------------------------------


@pytest.mark.parametrize("partitioning", ["iid", "dirichlet"])
def test_the_server_sets_are_disjoint_from_every_client_partition_and_the_clients_share_the_pool(
    partitioning,
):
    settings = RunSettings.from_run_config(app_config(partitioning=partitioning))
    split = split_for(settings)
    server = set(split.calibration.tolist()) | set(split.evaluation.tolist())
    assert len(split.calibration) == settings.calibration_size
    assert len(split.evaluation) == settings.evaluation_size

    # Partitions are data, not indices: find each client's examples back in the data set by content.
    rows = {row.tobytes(): i for i, row in enumerate(split.data.x.flatten(1).numpy())}
    seen: list[int] = []
    for partition_id in range(5):
        part = client_partition(settings, partition_id, 5)
        indices = [rows[row.tobytes()] for row in part.x.flatten(1).numpy()]
        assert not server & set(indices)
        seen += indices
    assert sorted(seen) == sorted(set(split.pool.tolist()))  # every pool example, to exactly one client


def test_a_client_outside_the_partitions_is_refused():
    with pytest.raises(ValueError, match=r"partition-id must be in \[0, 3\)"):
        client_partition(RunSettings.from_run_config(app_config()), 3, 3)


def test_the_strategy_key_picks_fedfuse_or_fedavg_with_every_node_sampled():
    settings = RunSettings.from_run_config(app_config(**{"min-nodes": 3}))
    split = split_for(settings)
    calibration = split.data.subset(split.calibration)
    fedfuse = build_strategy(settings, model_factory(settings, split.data), (calibration.x, calibration.y))
    assert isinstance(fedfuse, FedFuse)
    assert (fedfuse.fraction_train, fedfuse.min_train_nodes, fedfuse.min_available_nodes) == (1.0, 3, 3)
    fedavg = build_strategy(
        RunSettings.from_run_config(app_config(strategy="fedavg")), model_factory(settings, split.data), None
    )
    assert type(fedavg) is FedAvg


# --- `flwr run`: real simulations ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def simulation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], Path]]:
    """A simulation SuperLink, as `flwr run` would start it, but started (and stopped) by this module."""
    home = tmp_path_factory.mktemp("flwr-home")
    with simulation_superlink(home) as env:
        yield env, home


def run_app(simulation, name: str, *config: str) -> dict:
    """``flwr run`` the app from the repository root with 5 simulated nodes; return its metrics.json."""
    env, home = simulation
    # Not a folder named like a package ("fedfuse") in the SuperLink's working directory: Ray workers
    # run there with it on sys.path, and the folder would shadow the installed package.
    output = home / "outputs" / name
    overrides = " ".join([f"output-dir='{output}'", *config])
    completed = flwr_run(
        [str(APP_DIR.relative_to(REPO)), "--federation-config", "num-supernodes=5", "-c", overrides],
        env=env,
        cwd=REPO,
        timeout=FLWR_RUN_TIMEOUT,
    )
    (home / f"{name}.flwr-run.log").write_text(completed.stdout + completed.stderr)  # kept for debugging
    log = f"{completed.stdout[-4000:]}\n{completed.stderr[-4000:]}"
    assert completed.returncode == 0, log
    assert (output / "metrics.json").is_file(), log
    return json.loads((output / "metrics.json").read_text())


@pytest.fixture(scope="module")
def fedfuse_run(simulation) -> dict:
    return run_app(simulation, "fedfuse")


@pytest.fixture(scope="module")
def fedavg_run(simulation) -> dict:
    return run_app(simulation, "fedavg", "strategy='fedavg'")


@pytest.mark.slow
def test_flwr_run_fuses_five_simulated_clients_one_shot_into_a_model_far_above_chance(fedfuse_run):
    assert fedfuse_run["strategy"] == "fedfuse" and fedfuse_run["num_rounds"] == 1
    assert fedfuse_run["train_metrics"]["1"]["fusion-clients"] == 5
    assert fedfuse_run["train_metrics"]["1"]["fusion-rejected"] == 0
    assert fedfuse_run["server_evaluation"]["0"]["accuracy"] < 0.25  # the untrained start: chance is 0.1
    assert fedfuse_run["final"]["accuracy"] > 0.75


@pytest.mark.slow
def test_the_saved_model_is_the_global_model_the_metrics_score(fedfuse_run):
    settings = RunSettings.from_run_config(fedfuse_run["run_config"])
    split = split_for(settings)
    model = model_factory(settings, split.data)()
    model.load_state_dict(torch.load(fedfuse_run["model_path"]))
    evaluation = split.data.subset(split.evaluation)
    scores = evaluate(model, evaluation.x, evaluation.y)
    assert scores["accuracy"] == pytest.approx(fedfuse_run["final"]["accuracy"])


@pytest.mark.slow
def test_flwr_run_with_strategy_fedavg_averages_the_same_federation(fedfuse_run, fedavg_run):
    assert fedavg_run["strategy"] == "fedavg"
    assert "fusion-clients" not in fedavg_run["train_metrics"]["1"]
    # The same clients trained the same way from the same start: only the aggregation differs.
    assert fedavg_run["train_metrics"]["1"]["train-loss"] == pytest.approx(
        fedfuse_run["train_metrics"]["1"]["train-loss"]
    )
    assert fedavg_run["final"]["accuracy"] > 0.5
    assert np.isfinite(fedavg_run["final"]["loss"])


# --- a run that trains nothing fails loudly --------------------------------------------------------------


def _result(train_metrics: dict[int, dict]) -> Result:
    return Result(
        arrays=ArrayRecord(),
        train_metrics_clientapp={r: MetricRecord(m) for r, m in train_metrics.items()},
    )


def test_the_trained_rounds_are_those_whose_fusion_did_not_fail_or_that_fedavg_aggregated():
    assert trained_rounds(_result({1: {"fusion-failed": 1}, 2: {"fusion-failed": 0}})) == [2]
    assert trained_rounds(_result({1: {"train_loss": 0.3}})) == [1]  # FedAvg: a round it aggregated
    assert trained_rounds(_result({})) == []


def test_a_run_in_which_no_round_produced_a_model_fails_loudly_and_saves_no_model(
    tmp_path, monkeypatch, caplog
):
    """A federation whose every node is lost: the app raises (the run fails) and writes no model.pt."""
    from unittest.mock import Mock

    from fedfuse_app import server_app
    from flwr.app import Context, RecordDict

    failed = _result({1: {"fusion-failed": 1, "fusion-clients": 0}})
    monkeypatch.setattr(FedFuse, "start", lambda self, **kwargs: failed)
    context = Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=app_config(**{"output-dir": str(tmp_path)}),
    )
    with pytest.raises(server_app.NoModelTrained, match="no round of 1 produced a fedfuse model"):
        server_app.main(Mock(), context)
    assert not (tmp_path / "model.pt").exists()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["trained_rounds"] == [] and metrics["model_path"] is None
    assert any(r.levelname == "ERROR" and "no round of 1" in r.getMessage() for r in caplog.records)
