"""Training the K clients of one setting through Flower's simulation runtime, and getting their models back.

One Flower run per setting: `flwr.simulation.run_simulation` runs, in this process, a ServerApp (in a
thread) against K simulated SuperNodes whose real ClientApps (`simulations.one_shot.client_app`) run
in Ray worker processes (``threads`` CPUs each). The ServerApp runs its phases one after another
(`phases_of`): the one-shot round with `ClientCollector` (FedAvg that keeps every client's model); then,
if asked, the multi-round references, each R rounds from the same shared init with epochs / R local
epochs a round: FedAvg (the same collector), and every Flower strategy named in ``--methods``
(`simulations.baselines.flower_strategies`), each a real ``flwr.serverapp.strategy`` instance running its
own ``start``. All phases share the run, so Flower and Ray start once a setting (about 10 s on two
cores, most of a digits run).

`run_simulation` is the in-process entry point of Flower's simulation runtime (`flwr run` starts the
same runtime in a SuperLink's subprocess). Flower marks it deprecated; it is used here because the
ServerApp then hands the models over in memory, with no SuperLink, ports or files. Its run config is
empty: the setting reaches the clients in the training messages' ConfigRecord, with the phase and the
strategy each message belongs to.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from torch import nn

from fedfuse.strategy.replies import node_of
from simulations.baselines.flower_strategies import FLOWER_STRATEGIES, build_strategy
from simulations.one_shot import client_app
from simulations.one_shot.collector import ClientCollector
from simulations.one_shot.progress_grid import ProgressGrid
from simulations.one_shot.setting import (
    HARNESS_FEDAVG,
    ONE_SHOT,
    PHASE_KEY,
    ROUNDS,
    SETTING_KEY,
    STRATEGY_KEY,
    Setting,
)


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
        strategy_rounds: Flower strategy name → its global model after ``fedavg_rounds`` rounds of its
            own (empty when no rounds or no strategy were asked for).
    """

    client_models: list[nn.Module]
    fedavg_one_shot: nn.Module
    fedavg_seconds: float
    fedavg_rounds: nn.Module | None
    seconds: float
    client_replies: list[Message] = field(default_factory=list)
    strategy_rounds: dict[str, nn.Module] = field(default_factory=dict)


@dataclass(frozen=True)
class Phase:
    """One strategy's run inside the ServerApp.

    Attributes:
        kind: `ONE_SHOT` or `ROUNDS`: how the clients train (`Setting.local_epochs`, their start, seeds).
        strategy: `HARNESS_FEDAVG` (the harness's `ClientCollector`) or a `FLOWER_STRATEGIES` name.
        rounds: how many rounds the strategy runs.
    """

    kind: str
    strategy: str
    rounds: int

    def config(self, setting: Setting) -> ConfigRecord:
        """The training messages' ConfigRecord: the setting, and which phase and strategy they are for."""
        return ConfigRecord(
            {SETTING_KEY: setting.to_json(), PHASE_KEY: self.kind, STRATEGY_KEY: self.strategy}
        )

    @property
    def description(self) -> str:
        """The progress bar's label (the round number follows)."""
        if self.kind == ONE_SHOT:
            return "Flower one-shot round"
        return "Flower FedAvg round" if self.strategy == HARNESS_FEDAVG else f"Flower {self.strategy} round"


def phases_of(setting: Setting, strategies: Sequence[str] = ()) -> list[Phase]:
    """The ServerApp's phases, in order: the one-shot round; then, when ``setting.fedavg_rounds`` R > 0,
    R rounds of the harness's FedAvg and R rounds of each Flower strategy in ``strategies``.

    Raises:
        ValueError: a name that is not a Flower strategy (`FLOWER_STRATEGIES`), or one named twice.
    """
    unknown = [name for name in strategies if name not in FLOWER_STRATEGIES]
    if unknown or len(set(strategies)) != len(strategies):
        raise ValueError(
            f"multi-round strategies must be distinct names of {', '.join(FLOWER_STRATEGIES)}; "
            f"got {list(strategies)}"
        )
    phases = [Phase(ONE_SHOT, HARNESS_FEDAVG, 1)]
    if setting.fedavg_rounds:
        phases += [Phase(ROUNDS, name, setting.fedavg_rounds) for name in (HARNESS_FEDAVG, *strategies)]
    return phases


class OrderedGrid(ProgressGrid):
    """The Grid a Flower strategy's rounds run through: what the harness needs, the strategy untouched.

    Replies go to the strategy in partition order, as `ClientCollector` puts them: a float sum depends on
    its order, and replies arrive in whatever order the clients finish, so the same setting then gives
    the same model, run after run. Flower's strategies log a failed reply and aggregate the rest; the
    harness refuses a reference that silently lost a client, so every failure is kept for
    `check_complete`.

    Attributes:
        failures: one line per failed or missing reply (node id and Flower's reason).
    """

    def __init__(self, grid: Grid, description: str, enabled: bool) -> None:
        super().__init__(grid, description, enabled)
        self.failures: list[str] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        # Read after the push, which gives the messages their ids.
        recipients = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        self.failures += [
            f"node {node_of(reply, recipients)}: {reply.error.reason}"
            for reply in replies
            if reply.has_error()
        ]
        if len(replies) < len(messages):
            self.failures.append(
                f"{len(messages) - len(replies)} of {len(messages)} nodes did not reply in time"
            )
        return sorted(replies, key=partition_order)

    def check_complete(self) -> None:
        """Raise if any reply failed or was missing, in any round so far.

        Raises:
            RuntimeError: listing the failures.
        """
        if self.failures:
            raise RuntimeError(f"{self._description}s lost clients: {'; '.join(self.failures)}")


def partition_order(reply: Message) -> tuple[bool, int]:
    """Sorts valid replies by the ``partition-id`` the harness's clients report, failed ones last."""
    if reply.has_error():
        return True, 0
    return False, int(reply.content["metrics"]["partition-id"])


def train_in_flower(
    setting: Setting,
    build: Callable[..., nn.Module],
    *,
    strategies: Sequence[str] = (),
    progress: bool,
    flower_logs: bool,
) -> FlowerTraining:
    """Run the setting's clients through Flower and return their models and the strategies'.

    Args:
        setting: the run; its ``num_clients`` SuperNodes are simulated.
        build: builds the setting's model (`Setting.model_builder`); ``seed=`` fixes its init.
        strategies: Flower strategies (`FLOWER_STRATEGIES` names) that also run ``fedavg_rounds``
            rounds each; ignored when ``fedavg_rounds`` is 0.
        progress: show a bar over each round's replies.
        flower_logs: show Flower's own log (INFO and up) and the ClientApps' output; otherwise only
            Flower's errors (a failed client is still reported, by ``check_complete``).

    Raises:
        RuntimeError: a client sent no model (the message names it and Flower's reason), or the
            ServerApp failed.
    """
    initial = ArrayRecord(build(seed=setting.shared_init_seed()).state_dict())
    phases = phases_of(setting, strategies)
    arrays: dict[Phase, ArrayRecord] = {}  # each phase's global model at its end
    checks: dict[Phase, ClientCollector | OrderedGrid] = {}  # what saw each phase's replies
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        for phase in phases:
            if phase.strategy == HARNESS_FEDAVG:
                strategy = checked = ClientCollector(setting.num_clients)
                phase_grid = ProgressGrid(grid, phase.description, progress)
            else:
                strategy = build_strategy(phase.strategy, setting.num_clients)
                phase_grid = checked = OrderedGrid(grid, phase.description, progress)
            result = strategy.start(
                grid=phase_grid,
                initial_arrays=initial,
                num_rounds=phase.rounds,
                train_config=phase.config(setting),
            )
            checks[phase], arrays[phase] = checked, result.arrays

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
    for phase in phases:
        if phase not in checks:
            raise RuntimeError(
                f"the Flower run ended before its {phase.description}s: see Flower's errors above"
            )
        checks[phase].check_complete()
    collector = checks[phases[0]]
    assert isinstance(collector, ClientCollector)  # the one-shot phase's, by `phases_of`
    rounds = {p.strategy: _model(build, arrays[p]) for p in phases if p.kind == ROUNDS}
    return FlowerTraining(
        client_models=[_model(build, collector.client_arrays[k]) for k in range(setting.num_clients)],
        fedavg_one_shot=_model(build, arrays[phases[0]]),
        fedavg_seconds=collector.aggregation_seconds,
        fedavg_rounds=rounds.pop(HARNESS_FEDAVG, None),
        seconds=seconds,
        client_replies=collector.replies,
        strategy_rounds=rounds,
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
