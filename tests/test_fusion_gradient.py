"""The gradient variant: levels trained by gradient descent, for chains and for declared architectures."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedfuse import FusionConfig, fuse
from fedfuse.fusion.batchnorm import renormalize_batchnorms
from fedfuse.fusion.declared import LevelSpec
from tests.permutation import permuted_copy
from tests.test_fusion_recovers_functions import assert_same_function, cnn, mlp, trained_statistics

GRADIENT = FusionConfig(variant="gradient")


def test_gradient_fusion_of_permuted_copies_recovers_the_function() -> None:
    torch.manual_seed(0)
    calibration = torch.randn(300, 3, 12, 12)
    model = trained_statistics(cnn(batch_norm=True), calibration)
    parents = [
        model,
        permuted_copy(model, seed=1, example=calibration),
        permuted_copy(model, seed=2, example=calibration),
    ]
    result = fuse(parents, calibration, GRADIENT)
    assert_same_function(result.model, model, torch.randn(100, 3, 12, 12), tolerance=1e-4)
    assert all(level.epochs is not None for level in result.report.levels)


def test_a_fresh_level_init_is_trained_to_the_targets() -> None:
    """From random weights (not the parent's), the levels still learn the permuted function."""
    torch.manual_seed(0)
    model = mlp().eval()
    calibration = torch.randn(500, 20)
    result = fuse(
        [model, permuted_copy(model, seed=1, example=calibration)],
        calibration,
        FusionConfig(variant="gradient", level_init="fresh"),
    )
    assert result.report.mean_fit_r2 > 0.98
    assert_same_function(result.model, model, torch.randn(200, 20), tolerance=0.15)


def test_a_layer_the_clients_froze_is_fused_by_the_gradient_variant_and_stays_frozen() -> None:
    """A frozen layer (``requires_grad=False``, a shared feature extractor) is a level like any other:
    its fit turns gradients on for the fit alone, and the fused model keeps the parents' flags."""
    torch.manual_seed(0)
    model = mlp().eval()
    model[1].requires_grad_(False)  # the first Linear
    calibration = torch.randn(500, 20)
    parents = [model, permuted_copy(model, seed=1, example=calibration)]
    result = fuse(parents, calibration, FusionConfig(variant="gradient", level_init="fresh"))
    assert result.report.mean_fit_r2 > 0.98
    assert_same_function(result.model, model, torch.randn(200, 20), tolerance=0.15)
    assert {name: p.requires_grad for name, p in result.model.named_parameters()} == {
        name: p.requires_grad for name, p in model.named_parameters()
    }


def test_gradient_fusion_is_bit_for_bit_reproducible() -> None:
    torch.manual_seed(0)
    parents = [mlp().eval() for _ in range(3)]
    calibration = torch.randn(200, 20)
    config = FusionConfig(variant="gradient", level_init="fresh", epochs=5, seed=4)
    first = fuse(parents, calibration, config).model.state_dict()
    second = fuse(parents, calibration, config).model.state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)


class TwoBlockNet(nn.Module):
    """A residual network whose levels are declared: a stem, a residual block, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(10, 16), nn.ReLU())
        self.block = Residual(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)))

    def fusion_levels(self) -> list[LevelSpec]:
        return [LevelSpec("stem"), LevelSpec("block", stream="stem"), LevelSpec("head")]


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


def permuted_residual_copy(model: TwoBlockNet, seed: int) -> TwoBlockNet:
    """The stream's channels permuted consistently through stem, block (both sides) and head."""
    order = torch.randperm(16, generator=torch.Generator().manual_seed(seed))
    hidden = torch.randperm(16, generator=torch.Generator().manual_seed(seed + 100))
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.stem[0].weight.copy_(model.stem[0].weight[order])
        out.stem[0].bias.copy_(model.stem[0].bias[order])
        first, second = model.block.inner[0], model.block.inner[2]
        out.block.inner[0].weight.copy_(first.weight[hidden][:, order])
        out.block.inner[0].bias.copy_(first.bias[hidden])
        out.block.inner[2].weight.copy_(second.weight[order][:, hidden])
        out.block.inner[2].bias.copy_(second.bias[order])
        out.head.weight.copy_(model.head.weight[:, order])
    return out


def test_declared_residual_levels_share_their_streams_grouping_and_recover_the_function() -> None:
    torch.manual_seed(0)
    model = TwoBlockNet().eval()
    copy_ = permuted_residual_copy(model, seed=3)
    calibration = torch.randn(300, 10)
    with torch.no_grad():
        assert torch.allclose(model(calibration), copy_(calibration), atol=1e-5)
    result = fuse([model, copy_], calibration, GRADIENT)
    assert [level.grouping for level in result.report.levels] == ["kmeans", "stream", "index"]
    assert_same_function(result.model, model, torch.randn(100, 10), tolerance=1e-4)


def test_levels_given_by_argument_take_precedence_over_the_models_declaration() -> None:
    torch.manual_seed(0)
    result = fuse(
        [TwoBlockNet(), TwoBlockNet()], torch.randn(64, 10), GRADIENT, levels=["stem", "block", "head"]
    )
    assert [level.name for level in result.report.levels] == ["stem", "block", "head"]
    assert [level.grouping for level in result.report.levels] == ["kmeans", "kmeans", "index"]


@pytest.mark.parametrize(
    ("levels", "message"),
    [
        (["stem", "nope", "head"], "declared level 'nope' is not a module"),
        (["stem", "head"], "parameter 'block.inner.0.weight' belongs to no declared level"),
        (["stem", "stem.0", "block", "head"], "overlap"),
        (
            [LevelSpec("stem"), LevelSpec("block", stream="head"), LevelSpec("head")],
            "not a level declared before",
        ),
        ([], "declaration is empty"),
    ],
)
def test_level_declarations_that_do_not_fit_the_model_are_explained(levels: list, message: str) -> None:
    model = TwoBlockNet()
    with pytest.raises(ValueError, match=message):
        fuse([model, TwoBlockNet()], torch.randn(16, 10), GRADIENT, levels=levels)


def test_the_linear_variant_refuses_declared_levels_and_points_to_the_gradient_variant() -> None:
    with pytest.raises(ValueError, match="variant='gradient'"):
        fuse([TwoBlockNet(), TwoBlockNet()], torch.randn(16, 10), FusionConfig(variant="linear"))


def test_renormalizing_batchnorm_keeps_the_function_and_matches_the_statistics() -> None:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU()).eval()
    inputs = torch.randn(64, 3, 8, 8) * 3 + 1
    with torch.no_grad():
        before = block(inputs)
    assert renormalize_batchnorms([block], lambda: block(inputs)) == 1
    with torch.no_grad():
        after = block(inputs)
        conv_out = block[0](inputs)
    assert torch.allclose(before, after, atol=1e-5)
    assert torch.allclose(block[1].running_mean, conv_out.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(block[1].running_var, conv_out.var(dim=(0, 2, 3), unbiased=False), rtol=1e-4)


def test_a_declared_architecture_cannot_be_resized_by_a_width_multiplier() -> None:
    with pytest.raises(ValueError, match="declared levels keep their width"):
        fuse(
            [TwoBlockNet(), TwoBlockNet()],
            torch.randn(16, 10),
            FusionConfig(variant="gradient", width_multiplier=2.0),
        )
