"""The quickstart benchmark's strategy variants (docs/benchmarks.md): FedFuse without its guard, and
FedAvg with it, the baseline given the same server-side data as FedFuse's guard."""

from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from fedfuse import FedFuse
from fedfuse.fusion.calibration import CalibrationSet
from fedfuse.strategy.guard import compare
from quickstart_app.task import Net

#: The variants `guard_variant` builds, by the app's ``strategy`` config value.
VARIANTS = ("fedavg-guarded", "fedfuse-unguarded")


def guard_variant(
    name: str, calibration: tuple[torch.Tensor, torch.Tensor], fraction_evaluate: float
) -> Strategy:
    """The strategy ``name`` (one of `VARIANTS`).

    Raises:
        ValueError: an unknown name.
    """
    if name == "fedavg-guarded":
        return GuardedFedAvg(calibration=calibration, fraction_evaluate=fraction_evaluate)
    if name == "fedfuse-unguarded":
        return FedFuse(
            model_fn=Net, calibration=calibration, fraction_evaluate=fraction_evaluate, guard=False
        )
    raise ValueError(f"strategy must be fedavg, fedfuse or one of {', '.join(VARIANTS)}; got {name!r}")


class GuardedFedAvg(FedAvg):
    """FedAvg with FedFuse's guard: a round keeps the model it sent out when the clients' average
    classifies the server's calibration set significantly worse (`fedfuse.strategy.guard`). The
    baseline FedFuse's guard is measured against: FedAvg given the same server-side data."""

    def __init__(self, calibration: tuple[torch.Tensor, torch.Tensor], **kwargs) -> None:
        super().__init__(**kwargs)
        self.calibration = CalibrationSet(calibration, batch_size=256)
        self._sent: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or self._sent is None:
            return arrays, metrics
        previous, average = Net(), Net()
        previous.load_state_dict(self._sent.to_torch_state_dict())
        average.load_state_dict(arrays.to_torch_state_dict())
        worse = compare(previous, average, self.calibration).worse
        metrics = MetricRecord({**(metrics or {}), "fusion-kept-previous": int(worse)})
        return (self._sent if worse else arrays), metrics
