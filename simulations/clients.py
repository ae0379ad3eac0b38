"""Training K client models on their partitions, the way every simulation here starts."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from fedfuse.models import build_model
from simulations.datasets import Dataset
from simulations.training import train


@dataclass(frozen=True)
class TrainedClients:
    """K trained models, in partition order, and the wall-clock seconds each took to train."""

    models: list[nn.Module]
    seconds: list[float]


def train_clients(
    data: Dataset,
    partitions: Sequence[np.ndarray],
    *,
    model: str,
    init: str,
    epochs: int,
    seed: int,
    progress: bool = False,
    model_options: dict | None = None,
) -> TrainedClients:
    """Train one zoo model per partition of ``data``.

    Args:
        partitions: K index arrays into ``data``.
        model: zoo model name (`fedfuse.models.build_model`).
        init: ``"independent"`` (client k starts from weights seeded 1000·seed + k) or ``"shared"``
            (every client starts from the weights seeded 1000·seed, as after Flower's global init).
        epochs: local epochs.
        seed: client k trains with seed 1000·seed + k.
        model_options: keyword arguments for the model (e.g. ``{"width_multiplier": 0.25}``).
    """
    if init not in ("independent", "shared"):
        raise ValueError(f"init must be 'independent' or 'shared', got {init!r}")
    models, seconds = [], []
    for k, indices in enumerate(partitions):
        client_seed = 1000 * seed + k
        network = build_model(
            model,
            in_channels=data.in_channels,
            image_size=data.image_size,
            num_classes=data.num_classes,
            seed=client_seed if init == "independent" else 1000 * seed,
            **(model_options or {}),
        )
        started = time.perf_counter()
        train(
            network,
            data.x[indices],
            data.y[indices],
            epochs=epochs,
            seed=client_seed,
            progress=progress,
            description=f"client {k}",
        )
        seconds.append(time.perf_counter() - started)
        models.append(network.eval())
    return TrainedClients(models, seconds)
