"""The harness's Flower pieces without a running federation: the collecting strategy and the progress Grid.

Flower's ``Message`` cannot be built outside a running app; replies are faked with
``Mock(spec=Message)``, as Flower's own strategy tests do.
"""

from __future__ import annotations

import itertools
from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import Message

from simulations.one_shot.collector import ClientCollector
from simulations.one_shot.progress_grid import ProgressGrid
from tests.fake_replies import error_reply, train_reply


def reply(partition_id: int, value: float, examples: int) -> Mock:
    """A valid training reply of client ``partition_id``: one array filled with ``value``."""
    return train_reply(partition_id, value, examples=examples)


def test_the_collector_keeps_every_clients_model_by_partition_and_still_averages_as_fedavg() -> None:
    collector = ClientCollector(num_clients=2)
    arrays, _ = collector.aggregate_train(1, iter([reply(1, 4.0, 30), reply(0, 1.0, 10)]))
    assert sorted(collector.client_arrays) == [0, 1]
    assert collector.client_arrays[1]["w"].numpy().tolist() == [4.0] * 3
    np.testing.assert_allclose(arrays["w"].numpy(), 3.25)  # (10·1 + 30·4) / 40
    assert collector.aggregation_seconds >= 0.0
    collector.check_complete()


@pytest.mark.parametrize("arrival", list(itertools.permutations(range(3))))
def test_the_average_is_taken_in_partition_order_whatever_order_the_replies_arrive_in(arrival) -> None:
    # In float32, (1e8 - 1e8) + 1 keeps the 1 but (1e8 + 1) - 1e8 loses it: the order of the sum shows.
    values = {0: 1e8, 1: -1e8, 2: 1.0}
    arrays, _ = ClientCollector(num_clients=3).aggregate_train(1, [reply(k, values[k], 10) for k in arrival])
    np.testing.assert_array_equal(arrays["w"].numpy(), np.float32(1.0) / np.float32(3.0))


def test_a_missing_client_is_an_error_naming_its_partition_and_flowers_reason() -> None:
    collector = ClientCollector(num_clients=3)
    collector.aggregate_train(
        1, [reply(0, 1.0, 10), error_reply("ClientAppException: out of memory", node_id=7), reply(2, 2.0, 5)]
    )
    with pytest.raises(RuntimeError, match=r"2 of 3 client models \(partitions without one: \[1\]\)"):
        collector.check_complete()
    with pytest.raises(RuntimeError, match="failed replies: node 7: ClientAppException: out of memory"):
        collector.check_complete()


def test_a_client_that_failed_in_an_earlier_round_is_an_error_too() -> None:
    collector = ClientCollector(num_clients=2)
    collector.aggregate_train(1, [reply(0, 1.0, 10), error_reply("timeout", node_id=8)])
    collector.aggregate_train(2, [reply(0, 1.0, 10), reply(1, 2.0, 10)])
    with pytest.raises(RuntimeError, match=r"2 of 2 client models .*node 8: timeout"):
        collector.check_complete()


class FakeGrid:
    """Replies to pushed messages a few at a time, as clients finishing one after another would."""

    def __init__(self, batches: list[int]) -> None:
        self.batches = batches
        self.pulls = 0

    def push_messages(self, messages):
        return [f"id-{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        self.pulls += 1
        count = self.batches.pop(0) if self.batches else 0
        replies = []
        for message_id in sorted(message_ids)[:count]:
            answer = Mock(spec=Message)
            answer.metadata.reply_to_message_id = message_id
            replies.append(answer)
        return replies


def test_the_progress_grid_collects_replies_as_they_come_until_all_have_replied() -> None:
    fake = FakeGrid(batches=[0, 2, 0, 1])
    grid = ProgressGrid(fake, "round", enabled=True)  # the fake has only what send_and_receive uses
    replies = grid.send_and_receive(["a", "b", "c"], timeout=30)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["id-0", "id-1", "id-2"]
    assert fake.pulls == 4


def test_the_progress_grid_gives_up_at_the_timeout_with_the_replies_it_has() -> None:
    grid = ProgressGrid(FakeGrid(batches=[1]), "round", enabled=False)
    assert len(grid.send_and_receive(["a", "b"], timeout=0.3)) == 1


def test_a_round_without_messages_returns_at_once() -> None:
    assert ProgressGrid(FakeGrid(batches=[]), "round", enabled=True).send_and_receive([]) == []
