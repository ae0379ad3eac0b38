"""The quickstart-style app (simulations/quickstart_app): Flower's quickstart-pytorch, offline, where
FedFuse replaces FedAvg in one line; run for real through ``flwr run`` on a simulation SuperLink."""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest.mock import Mock

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from quickstart_app.guard_variants import guard_variant
from quickstart_app.task import Net, load_data, load_images, load_server_sets

from fedfuse import describe_levels
from simulations.flower_processes import QUICKSTART_DIR, flwr_run, simulation_superlink
from tests.user_models import QuickstartNet

REPO = QUICKSTART_DIR.parents[1]
CONFIG = {
    "dataset": "digits",
    "data-dir": "",
    "calibration-size": 200,
    "evaluation-size": 400,
    "seed": 0,
    "partitioning": "iid",
    "dirichlet-alpha": 0.5,
    "batch-size": 32,
}


def test_the_apps_net_is_the_quickstarts_custom_module_as_written():
    assert Net.__bases__ == (torch.nn.Module,)
    ours, theirs = Net().state_dict(), QuickstartNet().state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert [level.name for level in describe_levels(Net(), torch.zeros(2, 3, 32, 32)).levels] == [
        "conv1",
        "conv2",
        "fc1",
        "fc2",
        "fc3",
    ]


def test_the_server_app_swaps_fedavg_for_fedfuse_in_one_line():
    """The strategy is the only difference: one FedAvg(...) line and one FedFuse(...) line, same arguments
    but FedFuse's model and calibration set."""
    source = (QUICKSTART_DIR / "quickstart_app" / "server_app.py").read_text()
    calls = [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("FedAvg", "FedFuse")
    ]
    assert sorted(call.func.id for call in calls) == ["FedAvg", "FedFuse"]
    fedavg, fedfuse = sorted(calls, key=lambda call: call.func.id)
    assert [k.arg for k in fedfuse.keywords] == ["model_fn", "calibration", *[k.arg for k in fedavg.keywords]]


@contextmanager
def task_identity() -> Iterator[None]:
    """What a running ServerApp sets, so that FedAvg can build its messages."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    try:
        yield
    finally:
        TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None


def training_reply(state: dict[str, torch.Tensor]) -> Mock:
    """A client's training reply as the app's ClientApp sends it."""
    message = Mock(spec=Message)
    message.has_error.return_value = False
    message.content = RecordDict(
        {"arrays": ArrayRecord(state), "metrics": MetricRecord({"train_loss": 0.5, "num-examples": 100})}
    )
    return message


def calibration_fitted_net(calibration: tuple[torch.Tensor, torch.Tensor]) -> Net:
    """A Net trained on the calibration set itself: one that classifies it well."""
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.003)
    for _ in range(40):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(calibration[0]), calibration[1]).backward()
        optimizer.step()
    return model


def test_the_guarded_fedavg_baseline_keeps_the_model_it_sent_when_the_clients_average_is_worse():
    calibration, _ = load_server_sets(CONFIG)
    strategy = guard_variant("fedavg-guarded", calibration, fraction_evaluate=0.0)
    fitted = calibration_fitted_net(calibration).state_dict()
    sent = ArrayRecord(fitted)
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = [1, 2]
    with task_identity():
        list(strategy.configure_train(2, sent, ConfigRecord(), grid))
    constant = Net()  # untrained: about one class for every input
    replies = [training_reply(constant.state_dict()), training_reply(constant.state_dict())]

    arrays, metrics = strategy.aggregate_train(2, replies)
    assert arrays is sent and metrics["fusion-kept-previous"] == 1

    arrays, metrics = strategy.aggregate_train(2, [training_reply(fitted), training_reply(fitted)])
    assert arrays is not sent and metrics["fusion-kept-previous"] == 0


def test_the_benchmarks_fedfuse_variant_has_its_guard_off_and_unknown_variants_are_refused():
    calibration, _ = load_server_sets(CONFIG)
    assert guard_variant("fedfuse-unguarded", calibration, fraction_evaluate=0.0).guard is False
    with pytest.raises(ValueError, match="strategy must be fedavg, fedfuse or one of"):
        guard_variant("fedfuse-guarded", calibration, fraction_evaluate=0.0)


def test_images_are_three_channel_32_pixel_squares_and_the_server_sets_never_reach_a_client():
    data = load_images("digits", "")
    assert data.x.shape[1:] == (3, 32, 32) and data.x.min() >= -1 and data.x.max() <= 1
    (calibration_x, _), evaluation = load_server_sets(CONFIG)
    server = {row.numpy().tobytes() for row in calibration_x} | {
        row.numpy().tobytes() for batch, _ in evaluation for row in batch
    }
    for partition in range(5):
        train, test = load_data(partition, 5, CONFIG)
        for loader in (train, test):
            assert not any(row.numpy().tobytes() in server for batch, _ in loader for row in batch)


@pytest.fixture(scope="module")
def simulation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], Path]]:
    """A simulation SuperLink, as `flwr run` would start it, but started (and stopped) by this module."""
    home = tmp_path_factory.mktemp("flwr-home")
    with simulation_superlink(home) as env:
        yield env, home


def run_app(simulation, name: str, *config: str) -> tuple[dict, Path]:
    env, home = simulation
    output = home / "outputs" / name
    overrides = " ".join([f"output-dir='{output}'", *config])
    completed = flwr_run(
        [str(QUICKSTART_DIR.relative_to(REPO)), "--federation-config", "num-supernodes=5", "-c", overrides],
        env=env,
        cwd=REPO,
        timeout=300,
    )
    log = f"{completed.stdout[-4000:]}\n{completed.stderr[-4000:]}"
    assert completed.returncode == 0, log
    assert (output / "metrics.json").is_file(), log
    return json.loads((output / "metrics.json").read_text()), output


@pytest.mark.slow
def test_flwr_run_fuses_the_quickstart_net_one_shot_and_saves_the_global_model(simulation):
    metrics, output = run_app(simulation, "fedfuse")
    round_one = metrics["train_metrics"]["1"]
    assert (round_one["fusion-clients"], round_one["fusion-rejected"], round_one["fusion-failed"]) == (
        5,
        0,
        0,
    )
    assert metrics["server_evaluation"]["0"]["accuracy"] < 0.25  # the untrained start: chance is 0.1
    assert metrics["final"]["accuracy"] > 0.6
    model = Net()
    model.load_state_dict(torch.load(output / "final_model.pt"))  # the Net's keys and shapes
