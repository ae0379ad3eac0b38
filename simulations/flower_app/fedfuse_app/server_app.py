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
from logging import INFO
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
    # Flower's Result holds an empty record when no round produced a model: the initial one stands.
    final_arrays = result.arrays if len(result.arrays) else initial_arrays
    save_outputs(output_dir, settings, context, final_arrays, result)


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
    folder: Path, settings: RunSettings, context: Context, arrays: ArrayRecord, result: Result
) -> None:
    """``model.pt`` (the final global state_dict) and ``metrics.json`` (server-side scores per round)."""
    model_path = folder / "model.pt"
    torch.save(arrays.to_torch_state_dict(), model_path)
    server = {str(r): _plain(m) for r, m in sorted(result.evaluate_metrics_serverapp.items())}
    metrics = {
        "strategy": settings.strategy,
        "dataset": settings.dataset,
        "num_rounds": settings.num_server_rounds,
        "final": server[max(server, key=int)] if server else None,
        "server_evaluation": server,
        "train_metrics": {str(r): _plain(m) for r, m in sorted(result.train_metrics_clientapp.items())},
        "run_config": dict(context.run_config),
        "model_path": str(model_path),
    }
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(
        INFO,
        "Saved %s and %s; final server-side scores: %s",
        model_path,
        folder / "metrics.json",
        metrics["final"],
    )


def _plain(record: MetricRecord) -> dict[str, object]:
    """A MetricRecord as strict JSON values (NaN, e.g. the fit R2 of a single client, becomes null)."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}
