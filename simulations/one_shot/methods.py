"""Every method of the comparison, scored on one setting's evaluation set from the same client models.

Rows, in order: each client alone, the best and the mean client, one-shot FedAvg (Flower's
example-weighted average), FedFuse for every variant and importance method asked for, the peer methods
asked for (`simulations.baselines.PEER_METHODS`: Git Re-Basin, OT fusion, RegMean, distillation, Flower's
strategies, each on the same client models and calibration set), the clients'
ensembles (K models at inference: logits or softmax averaged uniformly, or per class with the weights
FedFuse measures on the calibration set, and stacked on the calibration labels;
`simulations.baselines.ENSEMBLES`), the best of them (the fair bar: none has more information than
FedFuse), and optionally the multi-round references (FedAvg over R rounds with the same total local
epochs, and each Flower strategy asked for over the same R rounds: ``"flwr-fedprox 5 rounds"``) and
central training on the pooled client data (the ceiling).
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from torch import nn

from fedfuse import FusionConfig, describe_levels, fuse
from simulations.baselines import PEER_METHODS, PeerInputs, ensemble_predictions, run_peer
from simulations.baselines.flower_strategies import FLOWER_STRATEGIES
from simulations.federation import FederatedSplit
from simulations.one_shot.flower_training import FlowerTraining
from simulations.one_shot.setting import FUSION_WEIGHTS, Setting
from simulations.training import classification_scores, evaluate, train

#: What FedFuse weights the parents by: what the server measures on its calibration set (the default:
#: nothing disclosed), the clients' per-class label counts ([K, C]) or their example counts ([K]).
#: The scores of a `Row`, as `simulations.training.classification_scores` names them.
SCORES = ("accuracy", "macro_f1", "loss")
_CHECK_EXAMPLES = 8  # calibration examples `check_fusable` traces the model on


@dataclass(frozen=True)
class MethodOptions:
    """Which methods to run besides the fixed ones (clients, FedAvg one-shot, ensemble).

    Attributes:
        variants: FedFuse variants (`fedfuse.fusion.config.VARIANTS`).
        importances: FedFuse importance methods (`fedfuse.fusion.config.IMPORTANCES`).
        output_targets: FedFuse output-layer targets (`fedfuse.fusion.config.OUTPUT_TARGETS`); a run
            with another than ``"labels"`` (the default) is named after it: ``"fedfuse linear uniform
            auto"``.
        fusion_weights: one of `FUSION_WEIGHTS`.
        central: also train one model on the pooled client data.
        peers: peer methods run on the same client models (`simulations.baselines.PEER_METHODS`). The
            Flower strategies among them also run the multi-round setting when the setting has rounds
            (`round_strategies`).
        polish_epochs: when > 0, every FedFuse run is also scored with a polish of at most this many
            epochs on the calibration set (`FusionConfig.polish_epochs`), as ``"<method> polished"``.
    """

    variants: tuple[str, ...]
    importances: tuple[str, ...]
    output_targets: tuple[str, ...] = ("labels",)
    fusion_weights: str = "calibration"
    central: bool = True
    peers: tuple[str, ...] = ()
    polish_epochs: int = 0

    @property
    def round_strategies(self) -> tuple[str, ...]:
        """The Flower strategies asked for (``flwr-*``), each also run for the setting's R rounds."""
        return tuple(name for name in self.peers if name in FLOWER_STRATEGIES)

    def __post_init__(self) -> None:
        unknown = [name for name in self.peers if name not in PEER_METHODS]
        if unknown:
            raise ValueError(f"unknown peer method(s) {unknown}; choose from {', '.join(PEER_METHODS)}")
        if self.polish_epochs < 0:
            raise ValueError(f"polish_epochs must be >= 0, got {self.polish_epochs}")
        if not self.variants or not self.importances or not self.output_targets:
            raise ValueError(
                "MethodOptions needs at least one FedFuse variant, importance method and output target"
            )
        if self.fusion_weights not in FUSION_WEIGHTS:
            raise ValueError(
                f"fusion_weights must be one of {', '.join(map(repr, FUSION_WEIGHTS))}, "
                f"got {self.fusion_weights!r}"
            )


@dataclass(frozen=True)
class Row:
    """One method's scores on the evaluation set.

    Attributes:
        method: its name (``"client 0"``, ``"fedavg one-shot"``, ``"fedfuse linear uniform"``, ...).
        accuracy, macro_f1: shares in [0, 1]; loss: mean cross-entropy in nats.
        fusion_seconds: wall-clock seconds to merge the client models into this one (FedAvg's
            aggregation, FedFuse's fusion); None for methods that merge nothing.
        client: the partition id of a single client's row; None for every other row.
    """

    method: str
    accuracy: float
    macro_f1: float
    loss: float
    fusion_seconds: float | None = None
    client: int | None = None


@dataclass(frozen=True)
class Comparison:
    """The rows of one setting, and each FedFuse run's report (`FusionReport.to_dict`) by method name."""

    rows: list[Row]
    fusion_reports: dict[str, dict]


def compare(
    setting: Setting,
    split: FederatedSplit,
    clients: list[np.ndarray],
    label_counts: np.ndarray,
    trained: FlowerTraining,
    build: Callable[..., nn.Module],
    options: MethodOptions,
    *,
    progress: bool,
) -> Comparison:
    """Score every method on ``split``'s evaluation set.

    Args:
        setting: the run (seeds, epochs, FedAvg rounds).
        split: the data and the server's calibration and evaluation sets.
        clients: the K clients' index arrays into ``split.data`` (for central training).
        label_counts: int [K, C], the clients' label histogram (FedFuse's per-class weights).
        trained: the client models, FedAvg's and the multi-round references', from `train_in_flower`.
        build: builds the setting's model; ``seed=`` fixes its init.
        options: which FedFuse runs and references.
        progress: show the fusion's and central training's progress bars.
    """
    evaluation = split.data.subset(split.evaluation)
    calibration = split.data.subset(split.calibration)

    def score(method: str, model: nn.Module, **extra: float | int | None) -> Row:
        return Row(method, **_scores(evaluate(model, evaluation.x, evaluation.y)), **extra)

    rows = [score(f"client {k}", model, client=k) for k, model in enumerate(trained.client_models)]
    best = max(rows, key=lambda row: row.accuracy)
    mean = {key: statistics.mean(getattr(row, key) for row in rows) for key in SCORES}
    rows += [replace(best, method="best client", client=None), Row("mean client", **mean)]
    rows.append(score("fedavg one-shot", trained.fedavg_one_shot, fusion_seconds=trained.fedavg_seconds))

    weights = {
        "calibration": None,
        "labels": label_counts,
        "examples": label_counts.sum(axis=1),
    }[options.fusion_weights]
    reports = {}
    for variant, importance, target in itertools.product(
        options.variants, options.importances, options.output_targets
    ):
        config = FusionConfig(
            variant=variant, importance=importance, output_target=target, seed=setting.seed, progress=progress
        )
        name = f"fedfuse {variant} {importance}" + ("" if target == "labels" else f" {target}")
        runs = {name: config}
        if options.polish_epochs:
            runs[f"{name} polished"] = replace(config, polish_epochs=options.polish_epochs)
        for method, run in runs.items():
            result = fuse(trained.client_models, (calibration.x, calibration.y), config=run, weights=weights)
            rows.append(score(method, result.model, fusion_seconds=result.report.seconds))
            reports[method] = result.report.to_dict()

    inputs = PeerInputs(
        trained.client_models, (calibration.x, calibration.y), setting.seed, trained.client_replies
    )
    for name in options.peers:
        started = time.perf_counter()
        model = run_peer(name, inputs)
        rows.append(score(name, model, fusion_seconds=time.perf_counter() - started))

    ensembles = [
        Row(name, **_scores(classification_scores(logits, evaluation.y)))
        for name, logits in ensemble_predictions(
            trained.client_models, (calibration.x, calibration.y), evaluation.x
        ).items()
    ]
    rows += ensembles + [replace(max(ensembles, key=lambda row: row.accuracy), method="best ensemble")]
    if trained.fedavg_rounds is not None:
        rows.append(score(f"fedavg {setting.fedavg_rounds} rounds", trained.fedavg_rounds))
    for name, model in trained.strategy_rounds.items():
        rows.append(score(f"{name} {setting.fedavg_rounds} rounds", model))
    if options.central:
        rows.append(score("central", _train_central(setting, split, clients, build, progress)))
    return Comparison(rows, reports)


def check_fusable(setting: Setting, split: FederatedSplit, options: MethodOptions) -> None:
    """Every FedFuse variant asked for can fit the setting's model, read off its levels
    (`fedfuse.describe_levels`) before any training.

    Raises:
        ValueError: naming the variant and the model, with the engine's reason.
    """
    model = setting.model_builder(split.data)(seed=setting.client_init_seed(0))
    plan = describe_levels(model, split.data.subset(split.calibration[:_CHECK_EXAMPLES]).x)
    for variant in options.variants:
        try:
            plan.check(variant)
        except ValueError as error:
            raise ValueError(
                f"FedFuse's {variant} variant cannot fuse {setting.model!r} models (--variants chooses the "
                f"variants run; the default runs both): {error}"
            ) from error


def _train_central(
    setting: Setting,
    split: FederatedSplit,
    clients: list[np.ndarray],
    build: Callable[..., nn.Module],
    progress: bool,
) -> nn.Module:
    """One model trained on all clients' data pooled, from the shared init, for the same local epochs."""
    pooled = np.concatenate(clients)
    model = build(seed=setting.shared_init_seed())
    train(
        model,
        split.data.x[pooled],
        split.data.y[pooled],
        epochs=setting.epochs,
        lr=setting.lr,
        batch_size=setting.batch_size,
        seed=setting.central_seed(),
        progress=progress,
        description="central training",
    )
    return model.eval()


def _scores(scores: dict[str, float]) -> dict[str, float]:
    """The scores a `Row` keeps, from `classification_scores`' dict."""
    return {key: scores[key] for key in SCORES}
