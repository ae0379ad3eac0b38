"""Running the harness: one setting end to end, and a sweep of settings, each reported as it finishes."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from simulations.one_shot.flower_training import train_in_flower
from simulations.one_shot.methods import Comparison, MethodOptions, compare
from simulations.one_shot.setting import Setting
from simulations.partitioning import label_histogram


@dataclass(frozen=True)
class SettingResult:
    """One setting's outcome.

    Attributes:
        setting: the run.
        evaluation_size: the evaluation set's size (the setting may leave it to the default share).
        label_counts: int [K, C], the clients' label histogram.
        comparison: every method's scores and FedFuse's reports.
        flower_seconds: wall-clock seconds of the Flower run (start-up, client training, FedAvg).
        seconds: wall-clock seconds of the whole setting.
    """

    setting: Setting
    evaluation_size: int
    label_counts: np.ndarray
    comparison: Comparison
    flower_seconds: float
    seconds: float


def run_setting(
    setting: Setting, options: MethodOptions, *, progress: bool, flower_logs: bool
) -> SettingResult:
    """Split the data, train the clients through Flower, and score every method.

    The data set is loaded and split before Flower starts, so that a bad data folder or partitioning
    fails at once with its own message.
    """
    started = time.perf_counter()
    split = setting.federated_split()
    clients = setting.client_indices(split)
    label_counts = label_histogram(split.data.y.numpy(), clients, split.data.num_classes)
    build = setting.model_builder(split.data)
    trained = train_in_flower(
        setting, build, strategies=options.round_strategies, progress=progress, flower_logs=flower_logs
    )
    comparison = compare(setting, split, clients, label_counts, trained, build, options, progress=progress)
    return SettingResult(
        setting=setting,
        evaluation_size=len(split.evaluation),
        label_counts=label_counts,
        comparison=comparison,
        flower_seconds=trained.seconds,
        seconds=time.perf_counter() - started,
    )


def run_sweep(
    settings: Sequence[Setting],
    options: MethodOptions,
    *,
    progress: bool,
    flower_logs: bool,
    on_result: Callable[[SettingResult], None],
) -> list[SettingResult]:
    """`run_setting` for each setting in order, handing each result to ``on_result`` as it comes.

    A bar over the settings is shown when there are several (and ``progress``).
    """
    results = []
    bar = tqdm(settings, desc="settings", unit="setting", disable=not progress or len(settings) < 2)
    for setting in bar:
        bar.set_postfix_str(
            f"{setting.init} init, K={setting.num_clients}, {setting.partitioning_label}, seed {setting.seed}"
        )
        result = run_setting(setting, options, progress=progress, flower_logs=flower_logs)
        on_result(result)
        results.append(result)
    return results
