"""A round fused by index leaves out, by name, a client whose hidden neurons are not in the order the others
share (the same function with its neurons permuted): fused by index, they would mix unrelated neurons."""

# ruff: noqa: F811  (the fixtures imported from tests.test_strategy are redefined as arguments)
from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from fedfuse import FedFuse, describe_levels
from fedfuse.strategy.neuron_order import check_orders
from tests.permutation import permuted_copy
from tests.test_strategy import (  # noqa: F401  (fixtures shared with the strategy's tests)
    FakeGrid,
    calibration,
    flwr_log,
    make_net,
    reply,
    task_identity,
    trained_state,
    warnings_of,
)

NODES = (101, 102, 103, 104)
PERMUTING = 104


def _model(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = make_net()
    model.load_state_dict(state)
    return model.eval()


def permuting_client(node_id: int, received: dict[str, torch.Tensor]):
    state = trained_state(node_id, start=received)
    if node_id == PERMUTING:
        example = torch.randn(32, make_net()[0].in_features)
        state = permuted_copy(_model(state), seed=node_id, example=example).state_dict()
    return reply(node_id, state)


def _run(calibration, client, rounds: int):
    strategy = FedFuse(make_net, calibration, fraction_evaluate=0.0)
    torch.manual_seed(0)
    grid = FakeGrid(client, node_ids=NODES)
    return strategy.start(
        grid=grid.grid, initial_arrays=ArrayRecord(make_net().state_dict()), num_rounds=rounds
    )


def test_a_client_that_permuted_its_hidden_neurons_is_named_and_left_out_of_a_round_fused_by_index(
    task_identity, calibration, flwr_log
):
    result = _run(calibration, permuting_client, rounds=2)

    first, last = result.train_metrics_clientapp[1], result.train_metrics_clientapp[2]
    assert first["fusion-out-of-order-nodes"] == [PERMUTING] and first["fusion-clients"] == 3
    (named,) = [w for w in warnings_of(flwr_log) if f"node {PERMUTING} is left out" in w]
    assert "not in the order the other clients share" in named
    # the last round groups by k-means, which finds each neuron's match wherever it is
    assert last["fusion-out-of-order"] == 0 and last["fusion-clients"] == 4


def test_clients_that_trained_from_the_model_they_were_sent_are_all_fused(task_identity, calibration):
    def honest_client(node_id, received):
        return reply(node_id, trained_state(node_id, start=received))

    result = _run(calibration, honest_client, rounds=3)
    for round_ in (1, 2):
        assert result.train_metrics_clientapp[round_]["fusion-out-of-order"] == 0
        assert result.train_metrics_clientapp[round_]["fusion-clients"] == 4


def test_clients_that_share_no_order_are_not_named(calibration):
    independent = [_model(trained_state(seed)) for seed in range(4)]  # each from its own random init
    orders = check_orders(independent, describe_levels(independent[0], calibration[0][:8]), calibration[0])
    assert not orders.shared and orders.out_of_order == [None] * 4
