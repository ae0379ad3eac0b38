"""One point of a one-shot experiment: the federation, the clients' training, and every seed derived from it.

A `Setting` travels to the Flower ClientApps as JSON (in the training messages' ConfigRecord), so that
server and clients derive the same data split and seeds from it.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import numpy as np

from fedfuse.models import MODEL_NAMES
from simulations.dataset_names import DATASET_NAMES, SPLITS
from simulations.partitioning import check_scheme

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import nn

    from simulations.datasets import Dataset
    from simulations.federation import FederatedSplit

INITS = ("shared", "independent")
#: What FedFuse may weight the clients by (`simulations.one_shot.methods.MethodOptions.fusion_weights`).
FUSION_WEIGHTS = ("calibration", "labels", "examples")
#: The partitionings in words, for headers.
PARTITIONING_NAMES = {
    "iid": "IID",
    "dirichlet": "Dirichlet",
    "pathological": "pathological",
    "quantity-skew": "quantity skew",
}
#: The two kinds of Flower training phase: the one-shot round whose client models are compared, and the
#: multi-round references (R rounds from the shared init, one phase per strategy: the harness's FedAvg
#: and each Flower strategy named in ``--methods``). A training message names its phase and its strategy
#: (`STRATEGY_KEY`); the phase decides the client's local epochs, its start and its seeds.
ONE_SHOT, ROUNDS = "one-shot", "rounds"
PHASES = (ONE_SHOT, ROUNDS)
#: The zoo models whose width ``Setting.width_multiplier`` scales (`fedfuse.models.VGG11`).
WIDTH_MODELS = ("vgg11", "vgg11-bn")
#: The keys of a training message's ConfigRecord that say what it is for.
SETTING_KEY, PHASE_KEY, STRATEGY_KEY = "setting", "phase", "strategy"
#: The strategy of the one-shot round and of the first multi-round reference: the harness's own FedAvg
#: (`simulations.one_shot.collector.ClientCollector`).
HARNESS_FEDAVG = "fedavg"

# First entries of the keys that `Setting.derived_seed` spawns, one per kind of random choice.
_SHARED_INIT, _CLIENT_INIT, _TRAINING, _CENTRAL = range(4)


@dataclass(frozen=True)
class Setting:
    """Everything that decides one run of the harness, for one seed.

    Attributes:
        dataset, data_dir, split: the data (`simulations.datasets.load_dataset`); ``data_dir`` None
            for the embedded digits.
        model: a zoo model name (`fedfuse.models.MODEL_NAMES`).
        width_multiplier: scales VGG11's channels (`WIDTH_MODELS` only; e.g. 0.25: 0.6M weights on
            MNIST instead of 9.5M, so that a grid of settings runs on a CPU); None for the zoo's width.
        num_clients: K, at least 2.
        partitioning: how the client pool is shared out (`simulations.partitioning.PARTITIONINGS`).
        alpha: the Dirichlet concentration of ``dirichlet`` and ``quantity-skew``; None otherwise.
        classes_per_client: c of ``pathological``; None otherwise.
        init: ``"shared"``: every client starts the one-shot round from the global model the server
            sends (Flower's usual way); ``"independent"``: each client ignores it and starts from its
            own seeded random init.
        seed: the split, the partition, the inits, the training and the fusion all derive from it.
        calibration_size: the server's class-balanced calibration examples.
        evaluation_size: held-out examples nobody trains or fuses on; None for a fifth of the data.
        epochs: local epochs of the one-shot round, and of central training on the pooled data.
        lr, batch_size: Adam's learning rate and the batch size (`simulations.training.train`).
        fedavg_rounds: R of the multi-round references (R rounds of epochs / R local epochs, from the
            shared init): FedAvg, and every Flower strategy the run names; 0 for none. (The name
            predates the other strategies; it stays, as ``--fedavg-rounds`` does.)
        threads: torch CPU threads of every process (the harness and each ClientApp).
    """

    dataset: str = "digits"
    data_dir: str | None = None
    split: str = "t10k"
    model: str = "mlp"
    width_multiplier: float | None = None
    num_clients: int = 5
    partitioning: str = "dirichlet"
    alpha: float | None = 0.5
    classes_per_client: int | None = None
    init: str = "shared"
    seed: int = 0
    calibration_size: int = 200
    evaluation_size: int | None = None
    epochs: int = 20
    lr: float = 3e-3
    batch_size: int = 32
    fedavg_rounds: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        for name, choices in (
            ("dataset", DATASET_NAMES),
            ("split", SPLITS),
            ("model", MODEL_NAMES),
            ("init", INITS),
        ):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(
                    f"Setting.{name} must be one of {', '.join(map(repr, choices))}, got {value!r}"
                )
        check_scheme(self.partitioning, self.alpha, self.classes_per_client)
        for name, least in (
            ("num_clients", 2),
            ("calibration_size", 1),
            ("epochs", 1),
            ("batch_size", 1),
            ("threads", 1),
            ("seed", 0),
            ("fedavg_rounds", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"Setting.{name} must be an int >= {least}, got {value!r}")
        if self.evaluation_size is not None and (
            isinstance(self.evaluation_size, bool)
            or not isinstance(self.evaluation_size, int)
            or self.evaluation_size < 1
        ):
            raise ValueError(f"Setting.evaluation_size must be an int >= 1, got {self.evaluation_size!r}")
        if not self.lr > 0:
            raise ValueError(f"Setting.lr must be > 0, got {self.lr}")
        if self.width_multiplier is not None:
            if self.model not in WIDTH_MODELS:
                raise ValueError(
                    f"Setting.width_multiplier applies to {' and '.join(WIDTH_MODELS)}, not {self.model}"
                )
            if (
                isinstance(self.width_multiplier, bool)
                or not isinstance(self.width_multiplier, (int, float))
                or not self.width_multiplier > 0  # also refuses NaN
            ):
                raise ValueError(f"Setting.width_multiplier must be > 0, got {self.width_multiplier!r}")
        if self.fedavg_rounds and self.epochs % self.fedavg_rounds:
            raise ValueError(
                f"the multi-round references' {self.fedavg_rounds} rounds must share the {self.epochs} local "
                "epochs evenly (epochs / rounds local epochs a round): choose rounds that divide the epochs"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Setting:
        """The `Setting` that `to_json` wrote.

        Raises:
            ValueError: keys that are not the fields, or a value `Setting` refuses.
        """
        values = json.loads(text)
        expected = {field.name for field in fields(cls)}
        if not isinstance(values, dict) or set(values) != expected:
            keys = sorted(values) if isinstance(values, dict) else type(values).__name__
            raise ValueError(f"a Setting's JSON must hold exactly the keys {sorted(expected)}, got {keys}")
        return cls(**values)

    @property
    def partitioning_label(self) -> str:
        """The partitioning in words, e.g. ``"Dirichlet(alpha=0.3)"``."""
        if self.alpha is not None:
            return f"{PARTITIONING_NAMES[self.partitioning]}(alpha={self.alpha})"
        if self.classes_per_client is not None:
            return f"{PARTITIONING_NAMES[self.partitioning]}({self.classes_per_client} classes per client)"
        return PARTITIONING_NAMES[self.partitioning]

    def federated_split(self) -> FederatedSplit:
        """The data and the server's two sets (`simulations.federation.federated_split`)."""
        from simulations.federation import federated_split  # loads PyTorch: not needed to check a setting

        return federated_split(
            self.dataset,
            self.data_dir,
            self.calibration_size,
            self.evaluation_size,
            self.seed,
            split=self.split,
        )

    @property
    def model_options(self) -> dict[str, float]:
        """The keyword arguments the zoo model is built with besides the data's shape
        (`fedfuse.models.build_model`): ``width_multiplier`` where set."""
        return {} if self.width_multiplier is None else {"width_multiplier": self.width_multiplier}

    @property
    def model_label(self) -> str:
        """The model in words, e.g. ``"vgg11 (width 0.25)"``."""
        return (
            self.model if self.width_multiplier is None else f"{self.model} (width {self.width_multiplier})"
        )

    def model_builder(self, data: Dataset) -> Callable[..., nn.Module]:
        """A builder of the setting's model for ``data`` (`simulations.federation.model_builder`) with its
        `model_options`; ``seed=`` fixes its init. Server and clients build through it, so their models
        match."""
        from simulations.federation import model_builder  # loads PyTorch

        return functools.partial(model_builder(self.model, data), **self.model_options)

    def client_indices(self, split: FederatedSplit) -> list[np.ndarray]:
        """The K clients' shares of ``split``'s pool, index arrays into ``split.data``, in partition order."""
        return split.client_indices(
            self.partitioning,
            self.num_clients,
            self.seed,
            alpha=self.alpha,
            classes_per_client=self.classes_per_client,
        )

    def local_epochs(self, phase: str) -> int:
        """Local epochs a round: ``epochs`` one-shot, ``epochs / fedavg_rounds`` in a multi-round reference
        (every reference trains as long in all as the one-shot clients)."""
        return self.epochs if _checked(phase) == ONE_SHOT else self.epochs // self.fedavg_rounds

    def starts_independently(self, phase: str) -> bool:
        """Whether a client ignores the global model it receives and starts from its own init."""
        return _checked(phase) == ONE_SHOT and self.init == "independent"

    def shared_init_seed(self) -> int:
        """Seeds the global initial model the server sends (and central training's start)."""
        return self.derived_seed(_SHARED_INIT)

    def client_init_seed(self, partition_id: int) -> int:
        """Seeds client ``partition_id``'s own initial model under ``init="independent"``."""
        return self.derived_seed(_CLIENT_INIT, partition_id)

    def training_seed(self, phase: str, server_round: int, partition_id: int) -> int:
        """Seeds a client's shuffling and dropout in one round of one phase.

        The strategy is not part of the key: in round r every multi-round reference's client p shuffles
        alike, so that two references differ by their strategy alone (FedProx's proximal term, FedMedian's
        median), not by the luck of their batches.
        """
        return self.derived_seed(_TRAINING, PHASES.index(_checked(phase)), server_round, partition_id)

    def central_seed(self) -> int:
        """Seeds central training's shuffling and dropout."""
        return self.derived_seed(_CENTRAL)

    def derived_seed(self, *key: int) -> int:
        """A 32-bit seed for the random choice named by ``key``: ``numpy``'s SeedSequence spawned from
        ``seed`` with that key, so that choices are independent of one another and of their order."""
        return int(np.random.SeedSequence(self.seed, spawn_key=key).generate_state(1)[0])


def _checked(phase: str) -> str:
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {', '.join(map(repr, PHASES))}")
    return phase
