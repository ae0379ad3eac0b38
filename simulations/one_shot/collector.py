"""A FedAvg strategy that also keeps every client's own trained model, and averages in a fixed order.

Flower's FedAvg returns only the average of the clients' models. The harness compares methods on the
very models the clients trained, so this strategy keeps each valid reply's ArrayRecord under the
partition id the client reported, and still aggregates the round as FedAvg does: after the one-shot
round its result is one-shot FedAvg, computed by Flower's own aggregation.

Replies arrive in whatever order the clients finish, and a float sum depends on its order, so the
replies are put in partition order first: the same setting then gives the same FedAvg model, bit for
bit, run after run.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedfuse.strategy.replies import node_of


class ClientCollector(FedAvg):
    """FedAvg over all ``num_clients`` nodes, no federated evaluation, keeping each client's model and
    averaging in partition order.

    Attributes:
        client_arrays: partition id → the ArrayRecord that client sent in the last round.
        replies: the last round's valid replies, in partition order (Flower's other strategies aggregate
            them too: `simulations.baselines.flower_strategies`).
        failures: one line per error reply (node id and Flower's reason), for the harness's message.
        aggregation_seconds: wall-clock seconds of FedAvg's aggregation of the last round.
    """

    def __init__(self, num_clients: int) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=num_clients,
            min_available_nodes=num_clients,
        )
        self.num_clients = num_clients
        self.client_arrays: dict[int, ArrayRecord] = {}
        self.replies: list[Message] = []
        self.failures: list[str] = []
        self.aggregation_seconds = 0.0
        self._instructions: list[Message] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """As FedAvg; the instructions are kept, so that an error reply Flower sends in a node's place
        (from the SuperLink) is named by the node it is about (`fedfuse.strategy.replies.node_of`)."""
        self._instructions = list(super().configure_train(server_round, arrays, config, grid))
        return self._instructions

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Keep every valid reply's arrays by its ``partition-id``, then aggregate as FedAvg, in partition
        order."""
        by_partition: dict[int, Message] = {}
        errors = []
        recipients = {m.metadata.message_id: m.metadata.dst_node_id for m in self._instructions}
        for reply in replies:
            if reply.has_error():
                self.failures.append(f"node {node_of(reply, recipients)}: {reply.error.reason}")
                errors.append(reply)
            else:
                partition_id = int(reply.content["metrics"]["partition-id"])
                self.client_arrays[partition_id] = reply.content["arrays"]
                by_partition[partition_id] = reply
        started = time.perf_counter()
        self.replies = [by_partition[k] for k in sorted(by_partition)]
        ordered = self.replies + errors
        aggregated = super().aggregate_train(server_round, ordered)
        self.aggregation_seconds = time.perf_counter() - started
        return aggregated

    def check_complete(self) -> None:
        """Raise unless every client replied with a model in every round so far.

        Raises:
            RuntimeError: naming the partitions that sent no model and the error replies' reasons.
        """
        missing = sorted(set(range(self.num_clients)) - set(self.client_arrays))
        if missing or self.failures:
            reasons = "; ".join(self.failures) or "no error reply (a timeout?)"
            raise RuntimeError(
                f"Flower returned {self.num_clients - len(missing)} of {self.num_clients} client models "
                f"(partitions without one: {missing}); failed replies: {reasons}"
            )
