"""Flower's own aggregation strategies run on the clients' real replies: FedAvg, FedProx, FedMedian,
FedTrimmedAvg and Krum from `flwr.serverapp.strategy`, each used as Flower ships it.

Two uses. In the one-shot comparison the harness keeps the Flower `Message` replies of the one-shot round
(`simulations.one_shot.collector`), and each strategy's ``aggregate_train`` is called on exactly those
replies (`flower_aggregate`): Flower's code decides the aggregate, weighting by the replies'
``num-examples`` where the strategy does (as Flower always does; the count is part of every Flower
training reply). One round of aggregation of models trained once: FedProx's proximal term acts in the
clients' training, so there its aggregation is FedAvg's and its row equals FedAvg's. In the harness's
multi-round setting (``--fedavg-rounds R``) each strategy named runs its own R rounds through its own
``start`` (`simulations.one_shot.flower_training`), and there FedProx's ``proximal-mu`` reaches the
clients, whose training adds the term (`simulations.training.train`).

The strategies evaluate nothing on the clients (``fraction_evaluate=0``): the harness scores every model
on the server's evaluation set, and its ClientApp has no evaluate handler.

Flower's FedMedian and FedTrimmedAvg (flwr 1.41) pop the arrays out of the replies they aggregate, so
each strategy here aggregates replies carrying copies of the contents, and the replies are given back as
they came.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence

from flwr.app import ArrayRecord, Message
from flwr.common.logger import LOGGER_NAME
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, Strategy

#: FedProx's mu. Li et al. (2020) tune it over {0.001, 0.01, 0.1, 1}; 0.1 is the middle that visibly acts
#: with the harness's Adam (on digits it keeps an MLP's 3-epoch update at about 60% of its length without
#: the term) without freezing the clients (mu 1 keeps it under 5%).
PROXIMAL_MU = 0.1


def _nodes(k: int) -> dict[str, float | int]:
    """Every one of the K nodes trains every round; none evaluates."""
    return {"min_train_nodes": k, "min_available_nodes": k, "fraction_evaluate": 0.0}


#: Name in the harness → Flower strategy built for K clients.
FLOWER_STRATEGIES: dict[str, Callable[[int], Strategy]] = {
    "flwr-fedavg": lambda k: FedAvg(**_nodes(k)),
    "flwr-fedprox": lambda k: FedProx(**_nodes(k), proximal_mu=PROXIMAL_MU),
    "flwr-fedmedian": lambda k: FedMedian(**_nodes(k)),
    "flwr-fedtrimmedavg": lambda k: FedTrimmedAvg(**_nodes(k)),
    "flwr-krum": lambda k: Krum(**_nodes(k), num_malicious_nodes=0),
}


def build_strategy(name: str, num_clients: int) -> Strategy:
    """Flower strategy ``name`` for ``num_clients`` nodes, as `FLOWER_STRATEGIES` builds it.

    Built with Flower's log held to errors: its only warnings here are about choices made on purpose
    (no federated evaluation), and a harness run builds each strategy once per setting.

    Raises:
        ValueError: an unknown name.
    """
    if name not in FLOWER_STRATEGIES:
        raise ValueError(f"unknown Flower strategy {name!r}; choose one of {', '.join(FLOWER_STRATEGIES)}")
    logger = logging.getLogger(LOGGER_NAME)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return FLOWER_STRATEGIES[name](num_clients)
    finally:
        logger.setLevel(level)


def flower_aggregate(name: str, replies: Sequence[Message]) -> ArrayRecord:
    """The arrays Flower strategy ``name`` aggregates from ``replies`` (training replies of one round).

    Raises:
        ValueError: an unknown name, or a strategy that aggregated nothing (no valid reply).
    """
    strategy = build_strategy(name, len(replies))
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
