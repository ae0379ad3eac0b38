"""The harness's ClientApp: trains on this node's share for one round and replies as a FedAvg client does.

The server's training messages carry, in their ConfigRecord, the run's `Setting` as JSON (``"setting"``),
the phase (``"phase"``: the one-shot round, or a round of a multi-round reference) and the strategy that
sent them (``"strategy"``: the harness's FedAvg or a Flower strategy's name). From them and its
``partition-id`` (set by Flower's simulation in the node config) the client derives its data, its local
epochs and its seeds. Under ``init="independent"`` it ignores the global model in the one-shot round and
starts from its own seeded random init. When the ConfigRecord holds ``"proximal-mu"`` (Flower's FedProx
puts it there) the client trains as a FedProx client does, with the proximal term toward the global
model it received.

The reply is a FedAvg client's (the model's ArrayRecord and ``num-examples``) plus ``partition-id``, so
that the server can tell the client models apart (Flower's node ids are drawn anew every run).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from simulations.baselines.flower_strategies import FLOWER_STRATEGIES
from simulations.one_shot.setting import HARNESS_FEDAVG, PHASE_KEY, SETTING_KEY, STRATEGY_KEY, Setting
from simulations.training import train

#: Where Flower's FedProx puts its mu in the training ConfigRecord (`flwr.serverapp.strategy.FedProx`).
PROXIMAL_MU_KEY = "proximal-mu"
#: The strategies a training message may come from.
STRATEGIES = (HARNESS_FEDAVG, *FLOWER_STRATEGIES)

app = ClientApp()


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Local training of this node's share, from the global model or (independent init) its own."""
    config = msg.content["config"]
    setting = Setting.from_json(str(config[SETTING_KEY]))
    phase, strategy = str(config[PHASE_KEY]), str(config[STRATEGY_KEY])
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(map(repr, STRATEGIES))}")
    server_round = int(config["server-round"])
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    if num_partitions != setting.num_clients or not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition {partition_id} of {num_partitions} does not fit a setting of {setting.num_clients} "
            "clients: run the simulation with num_supernodes = num_clients"
        )
    torch.set_num_threads(setting.threads)

    split = setting.federated_split()
    data = split.data.subset(setting.client_indices(split)[partition_id])
    build = setting.model_builder(split.data)
    if setting.starts_independently(phase):
        model = build(seed=setting.client_init_seed(partition_id))
    else:
        model = build()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    train(
        model,
        data.x,
        data.y,
        epochs=setting.local_epochs(phase),
        lr=setting.lr,
        batch_size=setting.batch_size,
        seed=setting.training_seed(phase, server_round, partition_id),
        proximal_mu=float(config.get(PROXIMAL_MU_KEY, 0.0)),
    )
    metrics = MetricRecord({"num-examples": len(data), "partition-id": partition_id})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)
