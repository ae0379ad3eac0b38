"""Flower's own aggregation strategies run on the clients' real replies: FedAvg, FedProx, FedMedian,
FedTrimmedAvg and Krum from `flwr.serverapp.strategy`, each used as Flower ships it.

The harness keeps the Flower `Message` replies of the one-shot round (`simulations.one_shot.collector`),
and each strategy's ``aggregate_train`` is called on exactly those replies: Flower's code decides the
aggregate, weighting by the replies' ``num-examples`` where the strategy does (as Flower always does; the
count is part of every Flower training reply). One round of aggregation of models trained once:
FedProx's proximal term acts in the clients' training, so its aggregation is FedAvg's, and its row
equals FedAvg's unless the clients trained with it.

Flower's FedMedian and FedTrimmedAvg (flwr 1.41) pop the arrays out of the replies they aggregate, so
each strategy here aggregates replies carrying copies of the contents, and the replies are given back as
they came.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, Strategy

#: Name in the harness → Flower strategy built for K clients.
FLOWER_STRATEGIES: dict[str, Callable[[int], Strategy]] = {
    "flwr-fedavg": lambda k: FedAvg(min_train_nodes=k, min_available_nodes=k),
    "flwr-fedprox": lambda k: FedProx(min_train_nodes=k, min_available_nodes=k),
    "flwr-fedmedian": lambda k: FedMedian(min_train_nodes=k, min_available_nodes=k),
    "flwr-fedtrimmedavg": lambda k: FedTrimmedAvg(min_train_nodes=k, min_available_nodes=k),
    "flwr-krum": lambda k: Krum(min_train_nodes=k, min_available_nodes=k, num_malicious_nodes=0),
}


def flower_aggregate(name: str, replies: Sequence[Message]) -> ArrayRecord:
    """The arrays Flower strategy ``name`` aggregates from ``replies`` (training replies of one round).

    Raises:
        ValueError: an unknown name, or a strategy that aggregated nothing (no valid reply).
    """
    if name not in FLOWER_STRATEGIES:
        raise ValueError(f"unknown Flower strategy {name!r}; choose one of {', '.join(FLOWER_STRATEGIES)}")
    strategy = FLOWER_STRATEGIES[name](len(replies))
    contents = [reply.content for reply in replies]
    try:
        for reply, content in zip(replies, contents):
            reply.content = copy.deepcopy(content)
        arrays, _ = strategy.aggregate_train(1, list(replies))
    finally:
        for reply, content in zip(replies, contents):
            reply.content = content
    if arrays is None:
        raise ValueError(f"{name} aggregated nothing from {len(replies)} replies (none valid)")
    return arrays
