"""The public behaviour of `fuse`: its inputs, outputs, report and reproducibility."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedfuse import FusionConfig, FusionReport, fuse


def cnn_bn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 3 * 3, 12), nn.ReLU(), nn.Linear(12, 4),
    )  # fmt: skip


def independent_parents(count: int) -> list[nn.Module]:
    parents = []
    for seed in range(count):
        torch.manual_seed(seed)
        parents.append(cnn_bn().eval())
    return parents


INPUTS = torch.randn(96, 1, 8, 8, generator=torch.Generator().manual_seed(7))
LABELS = torch.randint(0, 4, (96,), generator=torch.Generator().manual_seed(8))


def test_same_seed_gives_bit_identical_fused_weights() -> None:
    config = FusionConfig(importance="gradient_x_activation", seed=3)
    first = fuse(independent_parents(3), (INPUTS, LABELS), config).model.state_dict()
    second = fuse(independent_parents(3), (INPUTS, LABELS), config).model.state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_the_fused_model_keeps_parent_zeros_architecture_keys_and_dtypes() -> None:
    parents = [p.double() for p in independent_parents(2)]
    fused = fuse(parents, INPUTS.double()).model
    assert type(fused) is type(parents[0]) and str(fused) == str(parents[0])
    reference = parents[0].state_dict()
    state = fused.state_dict()
    assert list(state) == list(reference)
    assert all(state[k].dtype == reference[k].dtype and state[k].shape == reference[k].shape for k in state)


def test_fusing_one_model_returns_an_equal_copy() -> None:
    parent = independent_parents(1)[0]
    result = fuse([parent], INPUTS)
    assert result.model is not parent
    assert all(
        torch.equal(a, b) for a, b in zip(result.model.state_dict().values(), parent.state_dict().values())
    )
    assert result.report.parents == 1 and result.report.levels == ()


@pytest.mark.parametrize(
    "calibration",
    [
        (INPUTS, LABELS),
        DataLoader(TensorDataset(INPUTS, LABELS), batch_size=10),
        [(INPUTS[i : i + 40], LABELS[i : i + 40]) for i in range(0, 96, 40)],
        DataLoader(
            TensorDataset(INPUTS, LABELS),
            batch_size=10,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
        ),
        (INPUTS, LABELS.to(torch.uint8)),
    ],
    ids=["pair", "dataloader", "list-of-batches", "shuffling-dataloader", "uint8-labels"],
)
def test_every_calibration_form_and_batching_gives_the_same_fusion(calibration: object) -> None:
    """Statistics are sums over rows, so how the calibration set is batched, or in which order its samples
    come, changes only round-off. A shuffling DataLoader is read once, so every pass pairs the same samples
    (read anew each pass, it fused mismatched activations: near chance accuracy). Round-off here is the
    float32 forward passes' (order-dependent sums), carried through the fits: up to about 2e-6 on outputs
    of size 1.7, a few units in the last place."""
    config = FusionConfig(importance="gradient_x_activation", batch_size=32)
    reference = fuse(independent_parents(2), (INPUTS, LABELS), config).model
    fused = fuse(independent_parents(2), calibration, config).model
    with torch.no_grad():
        torch.testing.assert_close(fused(INPUTS), reference(INPUTS), atol=1e-5, rtol=1e-5)


def test_inputs_alone_work_and_attributions_then_target_each_parents_own_prediction() -> None:
    result = fuse(independent_parents(2), INPUTS, FusionConfig(importance="conductance"))
    assert result.report.calibration_samples == 96


def test_the_report_prints_a_table_and_converts_to_a_json_ready_dict() -> None:
    report = fuse(independent_parents(3), INPUTS, FusionConfig(seed=5)).report
    assert isinstance(report, FusionReport)
    assert [level.name for level in report.levels] == ["0", "5", "7"]
    assert [level.grouping for level in report.levels] == ["kmeans", "kmeans", "index"]
    assert report.levels[0].rows == 96 * 6 * 6 and report.levels[0].fan_in == 9 + 1
    assert all(0 <= level.grouping_cost and level.fit_r2 <= 1 for level in report.levels)
    assert set(report.levels[0].seconds) == {"statistics", "importance", "grouping", "solve"}
    table = str(report)
    assert "fused 3 parents on 96 calibration samples" in table and "fit R2" in table
    data = json.loads(json.dumps(report.to_dict()))
    assert data["config"]["seed"] == 5 and len(data["levels"]) == 3 and "mean_fit_r2" in data


def test_per_class_weights_take_each_class_from_the_parents_that_hold_it() -> None:
    """Two parents share their hidden layers but not their heads; with label counts saying parent 0 alone
    holds classes 0-1 and parent 1 alone classes 2-3, each fused logit is its holder's logit."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(5, 16), nn.ReLU())
    parents = [nn.Sequential(copy.deepcopy(body), nn.Linear(16, 4)) for _ in range(2)]
    label_counts = [[50, 30, 0, 0], [0, 0, 20, 70]]
    calibration = torch.randn(200, 5)
    fused = fuse(parents, calibration, FusionConfig(ridge=0.0), weights=label_counts).model
    with torch.no_grad():
        out, first, second = fused(calibration), parents[0](calibration), parents[1](calibration)
    assert torch.allclose(out[:, :2], first[:, :2], atol=1e-4)
    assert torch.allclose(out[:, 2:], second[:, 2:], atol=1e-4)


@pytest.mark.slow
def test_fusing_independently_trained_classifiers_beats_plain_averaging_by_a_wide_margin() -> None:
    """Real data: four MLPs from different random inits, each trained on a label-skewed quarter of the
    digits; averaging their weights collapses, fusion keeps most of what they learned."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    x_eval, y_eval, x_cal, y_cal, x_pool, y_pool = x[:400], y[:400], x[400:700], y[400:700], x[700:], y[700:]
    parents = []
    for client in range(4):
        keep = (y_pool % 4 == client) | (
            torch.rand(len(y_pool), generator=torch.Generator().manual_seed(client)) < 0.3
        )
        torch.manual_seed(100 + client)
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(60):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x_pool[keep]), y_pool[keep]).backward()
            optimiser.step()
        parents.append(model.eval())

    def accuracy(model: nn.Module) -> float:
        with torch.no_grad():
            return (model(x_eval).argmax(1) == y_eval).float().mean().item()

    averaged = copy.deepcopy(parents[0])
    averaged.load_state_dict(
        {k: torch.stack([p.state_dict()[k] for p in parents]).mean(0) for k in averaged.state_dict()}
    )
    fused = fuse(parents, (x_cal, y_cal), FusionConfig(importance="conductance")).model
    mean_parent = sum(accuracy(p) for p in parents) / len(parents)
    seen = f"mean parent {mean_parent:.3f}, averaged {accuracy(averaged):.3f}, fused {accuracy(fused):.3f}"
    assert accuracy(fused) > accuracy(averaged) + 0.3, seen
    assert accuracy(fused) > mean_parent, seen


@pytest.mark.parametrize("variant", ["linear", "gradient"])
@pytest.mark.parametrize("multiplier", [0.5, 2.0])
def test_a_width_multiplier_resizes_every_hidden_level_and_keeps_the_keys(
    variant: str, multiplier: float
) -> None:
    parents = independent_parents(3)
    result = fuse(
        parents, (INPUTS, LABELS), FusionConfig(variant=variant, width_multiplier=multiplier, epochs=5)
    )
    assert [level.neurons for level in result.report.levels] == [
        round(6 * multiplier),
        round(12 * multiplier),
        4,
    ]
    state = result.model.state_dict()
    assert list(state) == list(parents[0].state_dict())
    assert state["0.weight"].shape == (round(6 * multiplier), 1, 3, 3)
    assert state["5.weight"].shape == (round(12 * multiplier), round(6 * multiplier) * 3 * 3)
    assert result.model(INPUTS).shape == (96, 4)


def test_twice_as_wide_a_fusion_of_two_parents_keeps_each_parents_neurons_apart() -> None:
    """With 2·n groups for 2·n parent neurons, nothing is merged: the grouping costs nothing and the fit
    reproduces the targets (the average of the parents' logits at the output) on the calibration set."""
    parents = independent_parents(2)
    result = fuse(parents, INPUTS, FusionConfig(width_multiplier=2.0, ridge=0.0))
    hidden = result.report.levels[:-1]
    assert all(level.grouping_cost < 1e-9 for level in hidden)
    assert all(level.fit_r2 > 1 - 1e-6 for level in result.report.levels)


def test_a_fused_model_wider_than_all_parents_neurons_together_is_refused() -> None:
    with pytest.raises(ValueError, match="width_multiplier 3 asks for more groups than the 2 parents"):
        fuse(independent_parents(2), INPUTS, FusionConfig(width_multiplier=3.0))


def test_hungarian_matching_cannot_change_the_width() -> None:
    with pytest.raises(ValueError, match="one to one"):
        fuse(independent_parents(2), INPUTS, FusionConfig(grouping="hungarian", width_multiplier=2.0))


def test_the_engine_and_the_zoo_never_import_flower() -> None:
    """The layers show in the folders: fusion and models are pure PyTorch, usable without Flower."""
    import subprocess
    import sys

    code = "import sys, fedfuse, fedfuse.fusion, fedfuse.models; print('flwr' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "False"


def test_importing_fedfuse_loads_neither_scikit_learn_nor_captum_nor_scipy() -> None:
    """A fast start: the heavy libraries load on first use (k-means, attribution, matching)."""
    import subprocess
    import sys

    code = (
        "import sys, fedfuse, fedfuse.fusion, fedfuse.models; "
        "print(sorted({'sklearn', 'captum', 'scipy'} & {m.split('.')[0] for m in sys.modules}))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"
