"""The harness's multi-round setting: every Flower strategy named runs its own rounds from the shared init,
its clients train as its messages say (FedProx's proximal term included), and each gets its row.

The pieces are tested without a federation (Flower's ``Message`` is faked with ``Mock(spec=Message)``, as
Flower's own tests do); one slow test runs the harness end to end through Flower's simulation.
"""

from __future__ import annotations

import contextlib
import io
from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg, FedProx

from simulations.baselines.flower_strategies import PROXIMAL_MU, build_strategy
from simulations.one_shot import client_app
from simulations.one_shot.cli import build_parser, main, plan
from simulations.one_shot.flower_training import OrderedGrid, Phase, phases_of
from simulations.one_shot.setting import HARNESS_FEDAVG, ONE_SHOT, ROUNDS, Setting
from tests.fake_replies import error_reply, train_reply


def test_without_rounds_the_server_runs_the_one_shot_round_alone() -> None:
    assert phases_of(Setting(), ["flwr-fedprox"]) == [Phase(ONE_SHOT, HARNESS_FEDAVG, 1)]


def test_with_rounds_fedavg_and_every_flower_strategy_named_get_their_own_phase() -> None:
    phases = phases_of(Setting(epochs=10, fedavg_rounds=5), ["flwr-fedprox", "flwr-fedmedian"])
    assert phases == [
        Phase(ONE_SHOT, HARNESS_FEDAVG, 1),
        Phase(ROUNDS, HARNESS_FEDAVG, 5),
        Phase(ROUNDS, "flwr-fedprox", 5),
        Phase(ROUNDS, "flwr-fedmedian", 5),
    ]
    assert [p.description for p in phases[1:]] == [
        "Flower FedAvg round",
        "Flower flwr-fedprox round",
        "Flower flwr-fedmedian round",
    ]


def test_a_phases_messages_say_which_phase_and_strategy_they_are_for() -> None:
    setting = Setting(epochs=10, fedavg_rounds=5)
    config = Phase(ROUNDS, "flwr-fedprox", 5).config(setting)
    assert (config["phase"], config["strategy"]) == (ROUNDS, "flwr-fedprox")
    assert Setting.from_json(str(config["setting"])) == setting


@pytest.mark.parametrize("strategies", [["flwr-fedma"], ["flwr-krum", "flwr-krum"], ["git-rebasin"]])
def test_only_distinct_flower_strategies_run_rounds(strategies: list[str]) -> None:
    with pytest.raises(ValueError, match="distinct names of flwr-fedavg"):
        phases_of(Setting(epochs=10, fedavg_rounds=5), strategies)


def test_the_harness_runs_rounds_of_the_flower_strategies_among_its_methods() -> None:
    _, options = plan(build_parser().parse_args(["--methods", "regmean,flwr-fedprox,flwr-krum"]))
    assert options.round_strategies == ("flwr-fedprox", "flwr-krum")


def test_every_reference_trains_as_long_in_all_and_from_the_same_batches() -> None:
    setting = Setting(init="independent", epochs=12, fedavg_rounds=4)
    assert setting.local_epochs(ROUNDS) * setting.fedavg_rounds == setting.local_epochs(ONE_SHOT)
    assert not setting.starts_independently(ROUNDS)
    with pytest.raises(ValueError, match="unknown phase 'fedprox'"):
        setting.local_epochs("fedprox")


# --- the Grid of a Flower strategy's rounds --------------------------------------------------------------


def reply(partition_id: int, value: float, message_id: str) -> Mock:
    return train_reply(partition_id, value, size=2, message_id=message_id)


class FakeGrid:
    """Gives every pushed instruction its id (as Flower's Grids do) and answers with ``replies``."""

    def __init__(self, replies: list[Mock]) -> None:
        self.replies = replies

    def push_messages(self, messages):
        ids = []
        for i, message in enumerate(messages):
            message.metadata.message_id = f"m{i}"
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, message_ids):
        replies, self.replies = self.replies, []
        return replies


def instructions(count: int) -> list[Mock]:
    messages = []
    for node in range(count):
        message = Mock(spec=Message)
        message.metadata.dst_node_id = 200 + node
        messages.append(message)
    return messages


def test_a_strategy_gets_its_replies_in_partition_order_whatever_order_they_arrive_in() -> None:
    arrived = [reply(2, 2.0, "m2"), reply(0, 0.0, "m0"), reply(1, 1.0, "m1")]
    grid = OrderedGrid(FakeGrid(arrived), "Flower flwr-fedmedian round", enabled=False)
    replies = grid.send_and_receive(instructions(3), timeout=5)
    assert [int(r.content["metrics"]["partition-id"]) for r in replies] == [0, 1, 2]
    grid.check_complete()


def test_a_failed_or_missing_reply_is_kept_and_refused_naming_the_node() -> None:
    arrived = [
        error_reply("ClientAppException: out of memory", node_id=1, message_id="m1"),
        reply(0, 0.0, "m0"),
    ]
    grid = OrderedGrid(FakeGrid(arrived), "Flower flwr-fedprox round", enabled=False)
    replies = grid.send_and_receive(instructions(3), timeout=0.3)
    assert not replies[0].has_error() and replies[1].has_error()  # failures last
    with pytest.raises(RuntimeError, match="node 201: ClientAppException: out of memory") as raised:
        grid.check_complete()
    assert "1 of 3 nodes did not reply in time" in str(raised.value)


def test_a_flower_strategy_aggregates_the_ordered_replies_as_flower_does() -> None:
    arrived = [reply(1, 1.0, "m1"), reply(2, 5.0, "m2"), reply(0, 0.0, "m0")]
    replies = OrderedGrid(FakeGrid(arrived), "round", enabled=False).send_and_receive(instructions(3))
    arrays, _ = build_strategy("flwr-fedmedian", 3).aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), 1.0)


# --- the ClientApp --------------------------------------------------------------------------------------


def client_message(setting: Setting, phase: Phase, strategy_config: dict) -> Mock:
    """A training message as the ServerApp sends it; ``strategy_config`` what the strategy adds."""
    config = phase.config(setting)
    for key, value in {"server-round": 1, **strategy_config}.items():
        config[key] = value
    model = setting.model_builder(setting.federated_split().data)(seed=setting.shared_init_seed())
    message = Mock(spec=Message)
    message.content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config})
    return message


def trained_with(monkeypatch: pytest.MonkeyPatch, message: Mock, num_clients: int) -> dict:
    """The keyword arguments the ClientApp trains with (training itself skipped)."""
    calls: list[dict] = []
    monkeypatch.setattr(client_app, "train", lambda *args, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(client_app, "Message", lambda content, reply_to: content)
    context = Mock(node_config={"partition-id": 1, "num-partitions": num_clients})
    client_app.train_handler(message, context)
    (kwargs,) = calls
    return kwargs


def test_a_fedprox_client_trains_with_the_mu_flowers_fedprox_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    setting = Setting(num_clients=3, epochs=4, fedavg_rounds=2)
    monkeypatch.setattr(FedAvg, "configure_train", lambda *_: [])  # no nodes to sample, no messages
    config = ConfigRecord()
    build_strategy("flwr-fedprox", 3).configure_train(1, ArrayRecord(), config, Mock())  # FedProx's part
    assert dict(config) == {"proximal-mu": PROXIMAL_MU} and PROXIMAL_MU > 0
    message = client_message(setting, Phase(ROUNDS, "flwr-fedprox", 2), dict(config))
    kwargs = trained_with(monkeypatch, message, num_clients=3)
    assert kwargs["proximal_mu"] == PROXIMAL_MU and kwargs["epochs"] == 2


def test_other_clients_train_without_the_proximal_term(monkeypatch: pytest.MonkeyPatch) -> None:
    setting = Setting(num_clients=3, epochs=4, fedavg_rounds=2)
    message = client_message(setting, Phase(ROUNDS, "flwr-fedmedian", 2), {})
    assert trained_with(monkeypatch, message, num_clients=3)["proximal_mu"] == 0.0


def test_a_client_refuses_a_message_of_an_unknown_strategy(monkeypatch: pytest.MonkeyPatch) -> None:
    setting = Setting(num_clients=3, epochs=4, fedavg_rounds=2)
    message = client_message(setting, Phase(ROUNDS, "fedyogi", 2), {})
    with pytest.raises(ValueError, match="unknown strategy 'fedyogi'"):
        trained_with(monkeypatch, message, num_clients=3)


# --- end to end -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_multi_round_run_reports_a_row_per_flower_strategy_beside_fedavgs(tmp_path) -> None:
    argv = [
        "--clients", "3", "--alpha", "0.3", "--epochs", "4", "--fedavg-rounds", "2",
        "--methods", "flwr-fedavg,flwr-fedprox,flwr-fedmedian", "--variants", "linear", "--no-central",
        "--calibration-size", "150", "--evaluation-size", "300", "--no-progress",
        "--output-dir", str(tmp_path),
    ]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        document = main(argv)
    rows = {row["method"]: row for row in document["settings"][0]["rows"]}
    references = [
        "fedavg 2 rounds",
        *(f"flwr-{name} 2 rounds" for name in ("fedavg", "fedprox", "fedmedian")),
    ]
    assert list(rows)[-4:] == references
    assert {"flwr-fedavg", "flwr-fedprox", "flwr-fedmedian"} <= set(rows)  # the one-shot aggregations stay
    for name in references:
        assert rows[name]["accuracy"] > 0.25  # chance: 0.1 (2 short rounds of a tiny MLP on 3 skewed clients)
    # Same init, same batches, replies in the same order: Flower's FedAvg gives the harness's FedAvg bit
    # for bit, and FedProx's proximal term and FedMedian's median alone make their models differ.
    assert rows["flwr-fedavg 2 rounds"]["loss"] == rows["fedavg 2 rounds"]["loss"]
    assert len({rows[name]["loss"] for name in references[1:]}) == 3


def test_fedprox_aggregates_as_fedavg_so_one_round_of_replies_gives_fedavgs_model() -> None:
    # Why the robustness benchmark (one aggregation of finished replies) has no FedProx row.
    assert FedProx.aggregate_train is FedAvg.aggregate_train
