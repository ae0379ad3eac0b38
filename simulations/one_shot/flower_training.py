"""Training the K clients of one setting through Flower's simulation runtime, and getting their models back.

One Flower run per setting: `flwr.simulation.run_simulation` runs, in this process, a ServerApp (in a
thread) against K simulated SuperNodes whose real ClientApps (`simulations.one_shot.client_app`) run
in Ray worker processes (``threads`` CPUs each). The ServerApp runs the one-shot round with
`ClientCollector` (FedAvg that keeps every client's model), then, if asked, R rounds of FedAvg (the
same strategy) from the same shared init with epochs / R local epochs a round. Both phases share the
run, so Flower and Ray start once a setting (about 10 s on two cores, most of a digits run).

`run_simulation` is the in-process entry point of Flower's simulation runtime (`flwr run` starts the
same runtime in a SuperLink's subprocess). Flower marks it deprecated; it is used here because the
ServerApp then hands the models over in memory, with no SuperLink, ports or files. Its run config is
empty: the setting reaches the clients in the training messages' ConfigRecord.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from torch import nn

from simulations.one_shot import client_app
from simulations.one_shot.collector import ClientCollector
from simulations.one_shot.progress_grid import ProgressGrid
from simulations.one_shot.setting import FEDAVG_ROUNDS, ONE_SHOT, Setting


@dataclass(frozen=True)
class FlowerTraining:
    """What one Flower run gave back.

    Attributes:
        client_models: the K trained client models, in partition order, in eval mode.
        fedavg_one_shot: Flower's FedAvg of those models (weighted by ``num-examples``).
        fedavg_seconds: wall-clock seconds of that aggregation.
        fedavg_rounds: the global model after ``fedavg_rounds`` rounds of FedAvg; None when not asked.
        seconds: wall-clock seconds of the whole run, Flower's and Ray's start-up included.
        client_replies: the clients' Flower replies of the one-shot round, in partition order.
    """

    client_models: list[nn.Module]
    fedavg_one_shot: nn.Module
    fedavg_seconds: float
    fedavg_rounds: nn.Module | None
    seconds: float
    client_replies: list[Message] = field(default_factory=list)


def train_in_flower(
    setting: Setting, build: Callable[..., nn.Module], *, progress: bool, flower_logs: bool
) -> FlowerTraining:
    """Run the setting's clients through Flower and return their models and FedAvg's.

    Args:
        setting: the run; its ``num_clients`` SuperNodes are simulated.
        build: builds the setting's model (`simulations.federation.model_builder`); ``seed=`` fixes
            its init.
        progress: show a bar over each round's replies.
        flower_logs: show Flower's own log (INFO and up) and the ClientApps' output; otherwise only
            Flower's errors (a failed client is still reported, by `ClientCollector.check_complete`).

    Raises:
        RuntimeError: a client sent no model (the message names it and Flower's reason), or the
            ServerApp failed.
    """
    initial = ArrayRecord(build(seed=setting.shared_init_seed()).state_dict())
    phases = [(ONE_SHOT, 1, "Flower one-shot round")]
    if setting.fedavg_rounds:
        phases.append((FEDAVG_ROUNDS, setting.fedavg_rounds, "Flower FedAvg round"))
    outcome: dict[str, tuple[ClientCollector, ArrayRecord]] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        for phase, rounds, description in phases:
            collector = ClientCollector(setting.num_clients)
            result = collector.start(
                grid=ProgressGrid(grid, description, progress),
                initial_arrays=initial,
                num_rounds=rounds,
                train_config=ConfigRecord({"setting": setting.to_json(), "phase": phase}),
            )
            outcome[phase] = collector, result.arrays

    started = time.perf_counter()
    with _flower_session(flower_logs):
        run_simulation(
            server_app=server,
            client_app=client_app.app,
            num_supernodes=setting.num_clients,
            backend_config={
                "client_resources": {"num_cpus": min(setting.threads, os.cpu_count() or 1), "num_gpus": 0.0},
                # The ClientApps' own output (Flower's log in the workers, Ray's notices) only with the log.
                "init_args": {"log_to_driver": flower_logs},
            },
        )
    seconds = time.perf_counter() - started
    for phase, _, _ in phases:
        if phase not in outcome:
            raise RuntimeError(f"the Flower run ended before its {phase} phase: see Flower's errors above")
        outcome[phase][0].check_complete()
    collector, fedavg = outcome[ONE_SHOT]
    return FlowerTraining(
        client_models=[_model(build, collector.client_arrays[k]) for k in range(setting.num_clients)],
        fedavg_one_shot=_model(build, fedavg),
        fedavg_seconds=collector.aggregation_seconds,
        fedavg_rounds=_model(build, outcome[FEDAVG_ROUNDS][1]) if setting.fedavg_rounds else None,
        seconds=seconds,
        client_replies=collector.replies,
    )


def _model(build: Callable[..., nn.Module], arrays: ArrayRecord) -> nn.Module:
    model = build()
    model.load_state_dict(arrays.to_torch_state_dict())
    return model.eval()


@contextlib.contextmanager
def _flower_session(verbose: bool) -> Iterator[None]:
    """Around `run_simulation`: keep the harness's output readable and its process as it was.

    Flower's INFO and WARNING log (a dozen lines a round, a deprecation notice a run) and Ray's start-up
    FutureWarning would bury the harness's tables: only errors show unless ``verbose``. Ray and Flower
    also set environment variables in this process (PYTHONPATH, PYTHONBREAKPOINT, ...) that would
    leak into later subprocesses; the environment is restored afterwards.
    """
    logger = logging.getLogger("flwr")
    level = logger.level
    environment = dict(os.environ)
    with warnings.catch_warnings():
        if not verbose:
            logger.setLevel(logging.ERROR)
            warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
        try:
            yield
        finally:
            logger.setLevel(level)
            os.environ.clear()
            os.environ.update(environment)
