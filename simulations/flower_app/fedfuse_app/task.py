"""What the ServerApp and the ClientApps share: the run's settings, the data split and the model.

Server and clients never exchange data. Each derives the same seeded split on its own from the same
run config: the server keeps a calibration set and an evaluation set; the rest is the client pool,
cut into ``num-partitions`` partitions of which a client trains on number ``partition-id``. So the
server-side sets are disjoint from every client's data by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from torch import nn

from fedfuse import FusionConfig
from simulations.datasets import Dataset
from simulations.federation import FederatedSplit, federated_split, model_builder

STRATEGIES = ("fedfuse", "fedavg")
PARTITIONINGS = ("iid", "dirichlet")


@dataclass(frozen=True)
class RunSettings:
    """The run config (``[tool.flwr.app.config]`` plus ``-c`` overrides), typed and checked.

    Every field is a kebab-case key of the app's pyproject (``local_epochs`` is ``local-epochs``),
    which holds the defaults and the meaning of each.
    """

    strategy: str
    num_server_rounds: int
    dataset: str
    data_dir: str
    model: str
    partitioning: str
    dirichlet_alpha: float
    local_epochs: int
    learning_rate: float
    batch_size: int
    calibration_size: int
    evaluation_size: int
    min_nodes: int
    seed: int
    fusion_variant: str
    fusion_grouping: str
    fusion_importance: str
    fusion_ridge: float
    fusion_timeout: float
    send_label_counts: bool
    output_dir: str

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> RunSettings:
        """Read every field from its kebab-case key; ints are accepted for floats (``-c "x=1"``).

        Raises:
            ValueError: a missing key, a value of the wrong type, or an unknown choice.
        """
        values = {}
        for field in fields(cls):
            key = field.name.replace("_", "-")
            if key not in run_config:
                raise ValueError(
                    f"run config misses '{key}' (see [tool.flwr.app.config] in the app's pyproject)"
                )
            values[field.name] = _typed(key, run_config[key], field.type)
        return cls(**values)

    def __post_init__(self) -> None:
        for key, value, choices in (
            ("strategy", self.strategy, STRATEGIES),
            ("partitioning", self.partitioning, PARTITIONINGS),
        ):
            if value not in choices:
                raise ValueError(f"'{key}' must be one of {', '.join(map(repr, choices))}, got {value!r}")
        if self.num_server_rounds < 1 or self.local_epochs < 0 or self.min_nodes < 1:
            raise ValueError("'num-server-rounds' and 'min-nodes' must be >= 1 and 'local-epochs' >= 0")
        if self.output_dir and not Path(self.output_dir).expanduser().is_absolute():
            raise ValueError(
                f"'output-dir' must be an absolute path (the ServerApp runs in the SuperLink's working "
                f"directory, not yours), got {self.output_dir!r}"
            )

    def fusion_config(self) -> FusionConfig:
        return FusionConfig(
            variant=self.fusion_variant,
            grouping=self.fusion_grouping,
            importance=self.fusion_importance,
            ridge=self.fusion_ridge,
            seed=self.seed,
        )


def _typed(key: str, value: object, annotation: str) -> object:
    """``value`` as the field's type, named by a string (``from __future__ import annotations``)."""
    if annotation == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = {"int": int, "float": float, "str": str, "bool": bool}[annotation]
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ValueError(f"'{key}' must be a {annotation}, got {value!r}")
    return value


def split_for(settings: RunSettings) -> FederatedSplit:
    return federated_split(
        settings.dataset,
        settings.data_dir,
        settings.calibration_size,
        settings.evaluation_size,
        settings.seed,
    )


def client_partition(settings: RunSettings, partition_id: int, num_partitions: int) -> Dataset:
    """Client ``partition_id``'s share of the pool (never any of the server's examples)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id must be in [0, {num_partitions}), got {partition_id}")
    alpha = settings.dirichlet_alpha if settings.partitioning == "dirichlet" else None
    split = split_for(settings)
    indices = split.client_indices(settings.partitioning, num_partitions, settings.seed, alpha=alpha)
    return split.data.subset(indices[partition_id])


def model_factory(settings: RunSettings, data: Dataset) -> Callable[..., nn.Module]:
    """A builder of the run's model for ``data``'s images; ``seed=`` fixes the initial weights."""
    return model_builder(settings.model, data)
