"""The ServerApp: runs FedFuse (or FedAvg) over the federation and saves the global model and its scores.

The server holds two sets of its own, cut from the data with the run's seed and disjoint from every
client's partition: the calibration set, which FedFuse fuses on and which never leaves the server,
and the evaluation set, on which the global model is scored before the first round and after each.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from logging import ERROR, INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Result
from torch import nn

from fedfuse import FedFuse
from fedfuse_app.task import RunSettings, model_factory, split_for
from simulations.training import evaluate

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured strategy for ``num-server-rounds`` and write ``model.pt`` and ``metrics.json``."""
    settings = RunSettings.from_run_config(context.run_config)
    output_dir = output_folder(settings)
    split = split_for(settings)
    calibration = split.data.subset(split.calibration)
    evaluation = split.data.subset(split.evaluation)
    model_fn = model_factory(settings, split.data)
    log(
        INFO,
        "%s on %s: %d calibration and %d evaluation examples kept on the server, %d in the client pool",
        settings.strategy,
        settings.dataset,
        len(calibration),
        len(evaluation),
        len(split.pool),
    )

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = model_fn()
        model.load_state_dict(arrays.to_torch_state_dict())
        return MetricRecord(evaluate(model, evaluation.x, evaluation.y))

    strategy = build_strategy(settings, model_fn, (calibration.x, calibration.y))
    initial_arrays = ArrayRecord(model_fn(seed=settings.seed).state_dict())
    result = strategy.start(
        grid=grid,
        initial_arrays=initial_arrays,
        num_rounds=settings.num_server_rounds,
        evaluate_fn=evaluate_fn,
    )
    rounds = trained_rounds(result)
    if not rounds:
        # Never end quietly with the untrained initial model: no model.pt, a loud error, a failed run.
        save_outputs(output_dir, settings, context, None, result)
        message = (
            f"no round of {settings.num_server_rounds} produced a {settings.strategy} model (too few valid "
            "replies, or every fusion failed: see the warnings above); no model.pt was written, "
            f"{output_dir / 'metrics.json'} says what each round did"
        )
        log(ERROR, "ServerApp: %s", message)
        raise NoModelTrained(message)
    save_outputs(output_dir, settings, context, result.arrays, result)


class NoModelTrained(RuntimeError):
    """No round of the run produced a new global model: the run fails rather than save the initial one."""


def trained_rounds(result: Result) -> list[int]:
    """The rounds that produced a new global model. FedFuse reports every round, with ``fusion-failed``
    1 when it kept the previous model; FedAvg reports only the rounds it aggregated."""
    return sorted(
        round_
        for round_, metrics in result.train_metrics_clientapp.items()
        if not metrics.get("fusion-failed", 0)
    )


def build_strategy(
    settings: RunSettings, model_fn: Callable[[], nn.Module], calibration: tuple[torch.Tensor, torch.Tensor]
) -> FedAvg:
    """FedFuse or FedAvg, sampling every node and waiting for ``min-nodes``; no federated evaluation,
    since the server scores the global model on its own evaluation set."""
    common = {
        "fraction_train": 1.0,
        "fraction_evaluate": 0.0,
        "min_train_nodes": settings.min_nodes,
        "min_available_nodes": settings.min_nodes,
    }
    if settings.strategy == "fedavg":
        return FedAvg(**common)
    return FedFuse(
        model_fn=model_fn,
        calibration=calibration,
        fusion_config=settings.fusion_config(),
        fusion_timeout=settings.fusion_timeout,
        parent_weights="label-counts" if settings.send_label_counts else "calibration",
        **common,
    )


def output_folder(settings: RunSettings) -> Path:
    """``output-dir``, or ``outputs/<time>-<strategy>`` in the working directory when it is empty.

    Created before the federation starts, so that a bad path fails at once, not after training.
    """
    if settings.output_dir:
        folder = Path(settings.output_dir).expanduser()
    else:
        folder = Path.cwd() / "outputs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{settings.strategy}"
    folder.mkdir(parents=True, exist_ok=True)
    log(INFO, "Outputs go to %s", folder)
    return folder


def save_outputs(
    folder: Path, settings: RunSettings, context: Context, arrays: ArrayRecord | None, result: Result
) -> None:
    """``model.pt`` (the final global state_dict; none when ``arrays`` is None, as when no round trained)
    and ``metrics.json`` (server-side scores per round, and which rounds produced a model)."""
    model_path = folder / "model.pt" if arrays is not None else None
    if arrays is not None:
        torch.save(arrays.to_torch_state_dict(), model_path)
    server = {str(r): _plain(m) for r, m in sorted(result.evaluate_metrics_serverapp.items())}
    metrics = {
        "strategy": settings.strategy,
        "dataset": settings.dataset,
        "num_rounds": settings.num_server_rounds,
        "final": server[max(server, key=int)] if server else None,
        "server_evaluation": server,
        "train_metrics": {str(r): _plain(m) for r, m in sorted(result.train_metrics_clientapp.items())},
        "trained_rounds": trained_rounds(result),
        "run_config": dict(context.run_config),
        "model_path": None if model_path is None else str(model_path),
    }
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(
        INFO,
        "Saved %s; final server-side scores: %s",
        " and ".join(str(path) for path in (model_path, folder / "metrics.json") if path is not None),
        metrics["final"],
    )


def _plain(record: MetricRecord) -> dict[str, object]:
    """A MetricRecord as strict JSON values (NaN, e.g. the fit R2 of a single client, becomes null)."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}
