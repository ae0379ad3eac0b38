"""Fusing copies of one network whose hidden neurons were shuffled must give back that network's function:
the grouping has to find the permutation and the fit has to reproduce it exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedfuse import FusionConfig, fuse
from tests.permutation import permuted_copy


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(20, 32),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(32, 16),
        nn.GELU(),
        nn.Linear(16, 5),
    )


def cnn(batch_norm: bool) -> nn.Sequential:
    def norm(channels: int) -> list[nn.Module]:
        return [nn.BatchNorm2d(channels)] if batch_norm else []

    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=not batch_norm), *norm(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 12, 5, stride=2, padding=2), *norm(12), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Flatten(),
        nn.Linear(12 * 3 * 3, 16),
        *([nn.BatchNorm1d(16)] if batch_norm else []),
        nn.ReLU(),
        nn.Linear(16, 4),
    )


def trained_statistics(model: nn.Module, inputs: torch.Tensor) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics, as training would."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(inputs + 0.5 * torch.randn_like(inputs))
    return model.eval()


def assert_same_function(
    fused: nn.Module, reference: nn.Module, inputs: torch.Tensor, tolerance: float
) -> None:
    fused.eval()
    with torch.no_grad():
        expected, actual = reference(inputs), fused(inputs)
    scale = expected.abs().max()
    assert (actual - expected).abs().max() <= tolerance * scale


@pytest.mark.parametrize("grouping", ["kmeans", "hungarian"])
def test_fusing_permuted_copies_of_an_mlp_recovers_the_function(grouping: str) -> None:
    torch.manual_seed(0)
    model = mlp().eval()
    calibration, held_out = torch.randn(400, 20), torch.randn(200, 20)
    result = fuse(
        [model, permuted_copy(model, seed=1, example=calibration)],
        calibration,
        FusionConfig(grouping=grouping, ridge=0.0),
    )
    assert_same_function(result.model, model, held_out, tolerance=1e-4)
    assert all(level.grouping_cost < 1e-8 for level in result.report.levels)
    assert all(level.fit_r2 > 1 - 1e-8 for level in result.report.levels)


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("importance", ["uniform", "gradient_x_activation"])
def test_fusing_four_permuted_copies_of_a_cnn_recovers_the_function(
    batch_norm: bool, importance: str
) -> None:
    torch.manual_seed(0)
    calibration, held_out = torch.randn(300, 3, 12, 12), torch.randn(100, 3, 12, 12)
    model = trained_statistics(cnn(batch_norm), calibration)
    parents = [model] + [permuted_copy(model, seed=s, example=calibration) for s in (1, 2, 3)]
    result = fuse(parents, calibration, FusionConfig(importance=importance, ridge=0.0))
    assert_same_function(result.model, model, held_out, tolerance=1e-4)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(2, 6, kernel_size=(3, 5), stride=(2, 1), padding=(1, 2)),
        nn.Conv2d(2, 6, kernel_size=3, padding="same", padding_mode="reflect"),
        nn.Conv2d(2, 6, kernel_size=4, padding="same", dilation=2, padding_mode="circular"),
        nn.Conv2d(2, 6, kernel_size=1, bias=False),
    ],
    ids=["rectangular-strided", "same-reflect", "even-kernel-dilated-circular", "pointwise-no-bias"],
)
def test_convolutions_of_any_kernel_stride_and_padding_are_recovered(conv: nn.Conv2d) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(6, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    calibration, held_out = torch.randn(200, 2, 10, 10), torch.randn(50, 2, 10, 10)
    result = fuse(
        [model, permuted_copy(model, seed=4, example=calibration)], calibration, FusionConfig(ridge=0.0)
    )
    assert_same_function(result.model, model, held_out, tolerance=1e-4)


def test_attribution_importance_methods_still_recover_permuted_copies() -> None:
    torch.manual_seed(0)
    model = mlp().eval()
    calibration = (torch.randn(200, 20), torch.randint(0, 5, (200,)))
    for importance in ("conductance", "deeplift"):
        result = fuse(
            [model, permuted_copy(model, seed=2, example=calibration)],
            calibration,
            FusionConfig(importance=importance, output_target="logits"),  # the labels are random here
        )
        assert_same_function(result.model, model, torch.randn(100, 20), tolerance=1e-2)


def test_fused_batchnorm_statistics_match_the_fused_layer_outputs() -> None:
    """The refitted BatchNorm holds the mean and variance of its layer's output on the calibration set,
    so in train mode (batch statistics) the fused model computes nearly what it computes in eval mode."""
    torch.manual_seed(0)
    calibration = torch.randn(512, 3, 12, 12)
    model = trained_statistics(cnn(batch_norm=True), calibration)
    fused = fuse(
        [model, permuted_copy(model, seed=1, example=calibration)], calibration, FusionConfig()
    ).model
    conv, norm = fused[0][0], fused[0][1]
    with torch.no_grad():
        outputs = conv(calibration)
    assert torch.allclose(norm.running_mean, outputs.mean(dim=(0, 2, 3)), atol=1e-4)
    assert torch.allclose(norm.running_var, outputs.var(dim=(0, 2, 3), unbiased=False), rtol=1e-3, atol=1e-5)
    with torch.no_grad():
        eval_out = fused.eval()(calibration)
        train_out = fused.train()(calibration)
    assert (train_out - eval_out).abs().max() < 0.05 * eval_out.abs().max()


def test_the_fused_batch_counter_is_the_parents_median_so_no_one_parent_sets_it() -> None:
    torch.manual_seed(0)
    calibration = torch.randn(256, 3, 12, 12)
    model = trained_statistics(cnn(batch_norm=True), calibration)
    parents = [copy.deepcopy(model) for _ in range(3)]
    for parent, count in zip(parents, (100, 120, 2**62)):
        parent[0][1].num_batches_tracked.fill_(count)
    fused = fuse(parents, calibration, FusionConfig()).model
    assert int(fused[0][1].num_batches_tracked) == 120
