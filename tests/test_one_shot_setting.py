"""The harness's `Setting`: what it accepts, how it travels to the clients, and the seeds it derives."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from simulations.one_shot.setting import ONE_SHOT, ROUNDS, Setting


def test_a_setting_survives_the_trip_to_the_clients_as_json() -> None:
    setting = Setting(partitioning="pathological", alpha=None, classes_per_client=3, evaluation_size=None)
    assert Setting.from_json(setting.to_json()) == setting


def test_json_with_missing_or_extra_keys_is_refused_naming_the_keys() -> None:
    with pytest.raises(ValueError, match="exactly the keys"):
        Setting.from_json('{"dataset": "digits"}')


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dataset": "svhn"}, "Setting.dataset must be one of"),
        ({"model": "gpt"}, "Setting.model must be one of"),
        ({"init": "random"}, "Setting.init must be one of"),
        ({"num_clients": 1}, "Setting.num_clients must be an int >= 2"),
        ({"epochs": 0}, "Setting.epochs must be an int >= 1"),
        ({"seed": -1}, "Setting.seed must be an int >= 0"),
        ({"lr": 0.0}, "Setting.lr must be > 0"),
        ({"epochs": 10, "fedavg_rounds": 3}, "must share the 10 local epochs evenly"),
        ({"partitioning": "iid"}, "alpha is meaningless for partitioning 'iid'"),
        ({"alpha": None}, "alpha is required for partitioning 'dirichlet'"),
        ({"partitioning": "pathological", "alpha": None}, "classes_per_client is required"),
    ],
)
def test_a_bad_setting_is_refused_naming_the_field(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Setting(**change)


def test_fedavg_rounds_share_the_one_shot_epochs_and_only_the_one_shot_round_may_start_independently() -> (
    None
):
    setting = Setting(init="independent", epochs=12, fedavg_rounds=4)
    assert setting.local_epochs(ONE_SHOT) == 12 and setting.local_epochs(ROUNDS) == 3
    assert setting.starts_independently(ONE_SHOT) and not setting.starts_independently(ROUNDS)
    assert not Setting(init="shared").starts_independently(ONE_SHOT)


def test_every_random_choice_gets_its_own_seed_and_the_same_seed_gives_the_same_ones() -> None:
    def seeds(setting: Setting) -> list[int]:
        return [
            setting.shared_init_seed(),
            *(setting.client_init_seed(k) for k in range(3)),
            *(
                setting.training_seed(phase, r, k)
                for phase in (ONE_SHOT, ROUNDS)
                for r in (1, 2)
                for k in range(3)
            ),
            setting.central_seed(),
        ]

    first = seeds(Setting(seed=4))
    assert first == seeds(Setting(seed=4))
    assert len(set(first)) == len(first)  # independent choices
    assert not set(first) & set(seeds(Setting(seed=5)))
    assert all(0 <= seed < 2**32 for seed in first)


def test_the_clients_split_the_pool_and_never_see_a_server_example() -> None:
    setting = Setting(num_clients=4, calibration_size=100, evaluation_size=300)
    split = setting.federated_split()
    clients = setting.client_indices(split)
    held = np.concatenate(clients)
    assert len(clients) == 4 and sorted(held.tolist()) == split.pool.tolist()
    assert not set(held.tolist()) & (set(split.calibration.tolist()) | set(split.evaluation.tolist()))
    assert (len(split.calibration), len(split.evaluation)) == (100, 300)


def test_the_evaluation_set_defaults_to_a_fifth_of_the_data() -> None:
    assert len(Setting().federated_split().evaluation) == 1797 // 5


def test_partitioning_labels_name_the_scheme_and_its_parameter() -> None:
    assert Setting(alpha=0.3).partitioning_label == "Dirichlet(alpha=0.3)"
    assert Setting(partitioning="iid", alpha=None).partitioning_label == "IID"
    pathological = dataclasses.replace(
        Setting(), partitioning="pathological", alpha=None, classes_per_client=2
    )
    assert pathological.partitioning_label == "pathological(2 classes per client)"


def test_a_vgg_width_travels_with_the_setting_and_every_model_is_built_at_it() -> None:
    setting = Setting(model="vgg11", width_multiplier=0.25)
    assert Setting.from_json(setting.to_json()) == setting  # how the clients learn it
    data = setting.federated_split().data
    narrow = setting.model_builder(data)(seed=0)
    full = dataclasses.replace(setting, width_multiplier=None).model_builder(data)(seed=0)
    channels = [m.out_channels for m in narrow.modules() if isinstance(m, torch.nn.Conv2d)]
    assert channels[0] == 16 and channels[-1] == 128  # 64 ... 512 at full width
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in full.parameters()) / 10
    assert setting.model_label == "vgg11 (width 0.25)" and Setting().model_label == "mlp"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"width_multiplier": 0.5}, "width_multiplier applies to vgg11 and vgg11-bn, not mlp"),
        ({"model": "vgg11-bn", "width_multiplier": -1.0}, "width_multiplier must be > 0"),
        ({"model": "vgg11", "width_multiplier": True}, "width_multiplier must be > 0"),
    ],
)
def test_a_width_is_refused_where_it_means_nothing(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Setting(**change)
