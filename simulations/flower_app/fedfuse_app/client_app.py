"""The ClientApp: trains the global model on this node's partition with PyTorch and sends it back.

It replies exactly what a FedAvg client replies (the model and ``num-examples``, plus its training
loss and accuracy), and the per-class ``label-counts`` only when the run opts in with
``send-label-counts = true``.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedfuse_app.task import RunSettings, client_partition, model_factory
from simulations.training import evaluate, train

app = ClientApp()


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Local training on this node's partition, from the global model in ``msg``."""
    settings = RunSettings.from_run_config(context.run_config)
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    data = client_partition(settings, partition_id, num_partitions)
    server_round = int(msg.content["config"]["server-round"])

    model = model_factory(settings, data)()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    train(
        model,
        data.x,
        data.y,
        epochs=settings.local_epochs,
        lr=settings.learning_rate,
        batch_size=settings.batch_size,
        # A different seed for every client and round, the same in every run of this config.
        seed=settings.seed + 1000 * server_round + partition_id,
    )
    scores = evaluate(model, data.x, data.y)
    metrics: dict[str, int | float | list[int]] = {
        "num-examples": len(data),
        "train-loss": scores["loss"],
        "train-accuracy": scores["accuracy"],
    }
    if settings.send_label_counts:
        metrics["label-counts"] = np.bincount(data.y.numpy(), minlength=data.num_classes).tolist()
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)
