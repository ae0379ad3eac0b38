"""Bad input gets a clear error naming what is wrong, and changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedfuse import FusionConfig, fuse


def mlp(hidden: int = 8, activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, hidden), activation(), nn.Linear(hidden, 3))


CALIBRATION = torch.randn(64, 6)


def test_parents_with_different_shapes_are_named_with_the_parameter() -> None:
    with pytest.raises(ValueError, match=r"parent 2's '0.weight' has shape \(9, 6\)"):
        fuse([mlp(), mlp(), mlp(hidden=9)], CALIBRATION)


def test_parents_with_different_keys_are_named_with_the_parameter() -> None:
    odd = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3, bias=False))
    with pytest.raises(ValueError, match=r"parent 1 lacks parameter '2.bias'"):
        fuse([mlp(), odd], CALIBRATION)


def test_parents_with_different_architectures_are_named_with_the_module() -> None:
    with pytest.raises(ValueError, match=r"parent 1's architecture differs from parent 0's at module '1'"):
        fuse([mlp(), mlp(activation=nn.Tanh)], CALIBRATION)


def test_parents_with_different_dtypes_are_named() -> None:
    with pytest.raises(ValueError, match=r"parent 1's '0.weight' is torch.float64"):
        fuse([mlp(), mlp().double()], CALIBRATION)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_parent_with_nan_or_inf_is_named(bad: float) -> None:
    broken = mlp()
    with torch.no_grad():
        broken[2].bias[1] = bad
    with pytest.raises(ValueError, match=r"parent 1 has NaN or Inf values in '2.bias'"):
        fuse([mlp(), broken], CALIBRATION)


def test_a_parent_whose_activations_overflow_is_named() -> None:
    overflowing = mlp()
    with torch.no_grad():  # finite weights whose float32 products are not
        overflowing[0].weight.mul_(1e30)
        overflowing[2].weight.mul_(1e30)
    with pytest.raises(ValueError, match=r"parent 1's outputs on the calibration set are not finite"):
        fuse([mlp(), overflowing], CALIBRATION)


@pytest.mark.parametrize(
    "empty", [torch.empty(0, 6), (torch.empty(0, 6), torch.empty(0, dtype=torch.long)), []]
)
def test_empty_calibration_data_is_an_error(empty: object) -> None:
    with pytest.raises(ValueError, match="calibration set is empty"):
        fuse([mlp(), mlp()], empty)


def test_a_one_shot_generator_is_refused_because_fusion_reads_the_data_once_per_level() -> None:
    with pytest.raises(TypeError, match="one-shot iterator"):
        fuse([mlp(), mlp()], (batch for batch in [CALIBRATION]))


def test_labels_that_do_not_match_the_inputs_are_an_error() -> None:
    with pytest.raises(ValueError, match="64 inputs but 10 labels"):
        fuse([mlp(), mlp()], (CALIBRATION, torch.zeros(10, dtype=torch.long)))
    with pytest.raises(ValueError, match="1-D tensor of class indices"):
        fuse([mlp(), mlp()], (CALIBRATION, torch.zeros(64)))


def test_a_calibration_set_smaller_than_the_fan_in_warns_and_the_ridge_keeps_the_solve_finite() -> None:
    torch.manual_seed(0)
    wide = [nn.Sequential(nn.Linear(50, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(2)]
    with pytest.warns(
        UserWarning, match=r"level '0': the 20 calibration rows span only 20 of the 51 dimensions"
    ):
        result = fuse(wide, torch.randn(20, 50))
    assert result.report.levels[0].ill_posed
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_hungarian_grouping_needs_exactly_two_parents() -> None:
    with pytest.raises(ValueError, match="exactly 2 parents; got 3"):
        fuse([mlp(), mlp(), mlp()], CALIBRATION, FusionConfig(grouping="hungarian"))


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0], r"shape \[2\] or \[2, C\]"),
        ([1.0, -1.0], "finite and non-negative"),
        ([1.0, 0.0], "parent 1 are 0"),
        ([[1.0, 2.0], [3.0, 4.0]], "2 columns; the output layer has 3 neurons"),
        (["a", "b"], "must be numbers"),
    ],
)
def test_bad_weights_are_explained(weights: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fuse([mlp(), mlp()], CALIBRATION, weights=weights)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("variant", "quadratic", "variant must be one of"),
        ("grouping", "random", "grouping must be one of"),
        ("importance", "saliency", "importance must be one of"),
        ("ridge", -1.0, "ridge must be finite and >= 0"),
        ("ridge", float("nan"), "ridge must be finite and >= 0"),
        ("batch_size", 0, "batch_size must be a positive int"),
        ("seed", -3, "seed must be a non-negative int"),
        ("kmeans_n_init", 1.5, "kmeans_n_init must be a positive int"),
    ],
)
def test_config_values_are_validated_at_the_boundary(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FusionConfig(**{field: value})


@pytest.mark.parametrize(
    ("model", "inputs", "message"),
    [
        (  # a layer norm over channels and positions: its parameters are per position
            nn.Sequential(nn.Conv2d(6, 8, 1), nn.LayerNorm([8, 1, 1]), nn.Flatten(), nn.Linear(8, 3)),
            CALIBRATION.view(64, 6, 1, 1),
            r"module '1' \(LayerNorm\) holds parameters that only the gradient variant fits",
        ),
        (
            nn.Sequential(
                nn.Linear(6, 8), nn.ReLU(), nn.BatchNorm1d(8, track_running_stats=False), nn.Linear(8, 3)
            ),
            CALIBRATION,
            "BatchNorm '2' keeps no running statistics",
        ),
        (
            nn.Sequential(nn.Conv2d(6, 8, 1, groups=2), nn.Flatten(), nn.Linear(8, 3)),
            CALIBRATION.view(64, 6, 1, 1),
            "convolution '0' has groups=2",
        ),
    ],
)
def test_modules_the_linear_variant_cannot_fuse_are_named(model: nn.Module, inputs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fuse([model, copy.deepcopy(model)], inputs, FusionConfig(variant="linear"))


def test_a_model_without_parameters_is_refused() -> None:
    model = nn.Sequential(nn.ReLU(), nn.Flatten())
    with pytest.raises(ValueError, match="no parameters to fuse"):
        fuse([model, copy.deepcopy(model)], CALIBRATION)


def test_a_module_called_twice_is_refused_by_its_name() -> None:
    shared = nn.Linear(6, 6)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(6, 3))
    with pytest.raises(ValueError, match=r"module '0' \(Linear\) holds parameters and is called 2 times"):
        fuse([model, copy.deepcopy(model)], CALIBRATION)


def test_parents_are_never_modified() -> None:
    torch.manual_seed(0)
    parents = [
        nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
        for _ in range(3)
    ]
    parents[1].eval()
    before = [copy.deepcopy(p.state_dict()) for p in parents]
    modes = [[m.training for m in p.modules()] for p in parents]
    result = fuse(parents, (CALIBRATION, torch.randint(0, 3, (64,))), FusionConfig(importance="deeplift"))
    for parent, state, mode in zip(parents, before, modes):
        assert all(torch.equal(parent.state_dict()[k], v) for k, v in state.items())
        assert [m.training for m in parent.modules()] == mode
        assert not parent._forward_hooks and not parent[0]._forward_hooks
    assert result.model is not parents[0]
    assert result.model.training  # parent 0's mode
