"""quickstart_app: the ServerApp, as in Flower's quickstart-pytorch, with FedFuse in place of FedAvg."""

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedfuse import FedFuse
from quickstart_app.guard_variants import guard_variant
from quickstart_app.task import Net, load_server_sets, test

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""
    fraction_evaluate: float = context.run_config["fraction-evaluate"]
    num_rounds: int = context.run_config["num-server-rounds"]
    lr: float = context.run_config["learning-rate"]
    calibration, evaluation = load_server_sets(context.run_config)

    torch.manual_seed(context.run_config["seed"])
    global_model = Net()
    arrays = ArrayRecord(global_model.state_dict())

    name = context.run_config["strategy"]
    if name == "fedavg":
        strategy = FedAvg(fraction_evaluate=fraction_evaluate)
    elif name == "fedfuse":  # the one line that changes: FedAvg(...) -> FedFuse(model_fn=Net, ...)
        strategy = FedFuse(model_fn=Net, calibration=calibration, fraction_evaluate=fraction_evaluate)
    else:  # the benchmark's variants: FedAvg with FedFuse's guard, FedFuse without it
        strategy = guard_variant(name, calibration, fraction_evaluate)

    def global_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Score the global model on the server's evaluation set."""
        model = Net()
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = test(model, evaluation, torch.device("cpu"))
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        train_config=ConfigRecord({"lr": lr}),
        num_rounds=num_rounds,
        evaluate_fn=global_evaluate,
    )
    save(context, result)


def save(context: Context, result) -> None:
    """``final_model.pt`` and ``metrics.json`` (server-side accuracy per round, the clients' metrics)."""
    configured = str(context.run_config["output-dir"])
    folder = Path(configured) if configured else Path.cwd() / "outputs" / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(result.arrays.to_torch_state_dict(), folder / "final_model.pt")
    server = {str(r): dict(m) for r, m in sorted(result.evaluate_metrics_serverapp.items())}
    metrics = {
        "strategy": context.run_config["strategy"],
        "server_evaluation": server,
        "final": server[max(server, key=int)],
        "train_metrics": {str(r): dict(m) for r, m in sorted(result.train_metrics_clientapp.items())},
        "run_config": dict(context.run_config),
    }
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
