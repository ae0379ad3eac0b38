"""The federation a simulation emulates on one data set: the server's two sets and the clients' shares.

The server keeps a class-balanced calibration set (what FedFuse fuses on) and an evaluation set; the
rest is the client pool, partitioned over the clients. Every piece is an index array into one
`Dataset` held in memory, and every piece follows from the seed, so that a server and its clients
(the Flower app's processes, or the one-shot harness and its ClientApps) derive the same split on
their own without exchanging data.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from fedfuse.models import build_model
from simulations.datasets import Dataset, load_dataset
from simulations.partitioning import partition, split_server_sets

#: The evaluation set's default size, as a share of the data set.
DEFAULT_EVALUATION_SHARE = 0.2


@functools.lru_cache(maxsize=2)
def cached_dataset(name: str, data_dir: str | None, split: str = "t10k") -> Dataset:
    """`load_dataset`, read once per process: a simulated client process serves many partitions, and a
    sweep many settings. ``data_dir`` may start with ``~``; None or ``""`` for the embedded digits."""
    return load_dataset(name, Path(data_dir).expanduser() if data_dir else None, split=split)


@dataclass(frozen=True)
class FederatedSplit:
    """The data set cut three ways by index: client pool, server calibration, server evaluation.

    Attributes:
        data: the whole data set.
        pool, calibration, evaluation: disjoint sorted index arrays (int64) into ``data``.
    """

    data: Dataset
    pool: np.ndarray
    calibration: np.ndarray
    evaluation: np.ndarray

    def client_indices(
        self, scheme: str, num_clients: int, seed: int, **parameters: float | int | None
    ) -> list[np.ndarray]:
        """The K clients' shares of the pool as index arrays into ``data`` (never a server example).

        The pool is partitioned by `simulations.partitioning.partition` with these arguments
        (``parameters``: the scheme's ``alpha`` or ``classes_per_client``).
        """
        labels = self.data.y.numpy()[self.pool]
        return [self.pool[part] for part in partition(labels, scheme, num_clients, seed, **parameters)]


def federated_split(
    dataset: str,
    data_dir: str | None,
    calibration_size: int,
    evaluation_size: int | None,
    seed: int,
    *,
    split: str = "t10k",
) -> FederatedSplit:
    """Load the data (`cached_dataset`) and split it with `split_server_sets`.

    Args:
        dataset, data_dir, split: as `load_dataset` takes them.
        calibration_size: class-balanced calibration examples.
        evaluation_size: evaluation examples; None for a fifth of the data set (rounded down).
        seed: seeds the split.
    """
    data = cached_dataset(dataset, data_dir, split)
    if evaluation_size is None:
        evaluation_size = int(len(data) * DEFAULT_EVALUATION_SHARE)
    pool, calibration, evaluation = split_server_sets(data.y.numpy(), calibration_size, evaluation_size, seed)
    return FederatedSplit(data, pool, calibration, evaluation)


def model_builder(name: str, data: Dataset) -> Callable[..., nn.Module]:
    """A builder of zoo model ``name`` for ``data``'s images and classes; ``seed=`` fixes its initial
    weights (`fedfuse.models.build_model`)."""
    return functools.partial(
        build_model,
        name,
        in_channels=data.in_channels,
        image_size=data.image_size,
        num_classes=data.num_classes,
    )
