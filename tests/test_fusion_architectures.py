"""Fusing the zoo's real architectures, their levels found by tracing: residual networks with BatchNorm
(either variant), a vision transformer (gradient variant: attention and LayerNorm make blocks), and VGG."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from fedfuse import FusionConfig, fuse
from fedfuse.models import build_model
from simulations.baselines import average_state_dicts
from simulations.clients import train_clients
from simulations.datasets import load_digits
from simulations.partitioning import dirichlet, split_server_sets
from simulations.training import evaluate
from tests.permutation import permuted_resnet_copy, permuted_vit_copy
from tests.test_fusion_recovers_functions import assert_same_function, trained_statistics

GRADIENT = FusionConfig(variant="gradient")


def zoo_model(name: str, seed: int = 0, **kwargs: object) -> nn.Module:
    return build_model(name, in_channels=1, image_size=8, num_classes=10, seed=seed, **kwargs)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("variant", ["linear", "gradient"])
def test_fusing_two_permuted_resnets_by_matching_recovers_the_function(
    images: torch.Tensor, variant: str
) -> None:
    """Each convolution is its own level; the identity block's conv2 and each projection block's conv2 and
    shortcut share their stream's grouping, and conv2 is fitted to the stream's target minus the fused
    shortcut."""
    torch.manual_seed(0)
    model = trained_statistics(zoo_model("resnet8"), images)
    copy_ = permuted_resnet_copy(model, seed=1)
    result = fuse([model, copy_], images, FusionConfig(variant=variant, grouping="hungarian", ridge=0.0))
    assert [(level.name, level.grouping) for level in result.report.levels] == [
        ("stem.0", "hungarian"),
        ("blocks.0.conv1", "hungarian"),
        ("blocks.0.conv2", "stream"),
        ("blocks.1.conv1", "hungarian"),
        ("blocks.1.conv2", "hungarian"),
        ("blocks.1.shortcut.0", "stream"),
        ("blocks.2.conv1", "hungarian"),
        ("blocks.2.conv2", "hungarian"),
        ("blocks.2.shortcut.0", "stream"),
        ("head.2", "index"),
    ]
    # float64 statistics, float32 weights, rank-deficient patches of 1x1 maps: the closed form is exact
    # to 1e-3
    assert_same_function(
        result.model, model, torch.rand(100, 1, 8, 8), tolerance=1e-3 if variant == "linear" else 1e-4
    )


def test_fusing_three_permuted_resnets_by_kmeans_recovers_the_function_closely(images: torch.Tensor) -> None:
    """Dead channels (identical zero outputs) let k-means put duplicates where parent 0 has dead channels,
    so the aligned start is not exact there and training closes most of the gap."""
    torch.manual_seed(0)
    model = trained_statistics(zoo_model("resnet8"), images)
    parents = [model, permuted_resnet_copy(model, seed=1), permuted_resnet_copy(model, seed=2)]
    result = fuse(parents, images, GRADIENT)
    assert_same_function(result.model, model, torch.rand(100, 1, 8, 8), tolerance=0.1)


@pytest.mark.parametrize(("level_init", "tolerance"), [("aligned", 1e-4), ("fresh", 0.2)])
def test_fusing_permuted_vits_recovers_the_function(
    images: torch.Tensor, level_init: str, tolerance: float
) -> None:
    torch.manual_seed(0)
    model = zoo_model("vit").eval()
    parents = [model, permuted_vit_copy(model, seed=1), permuted_vit_copy(model, seed=2)]
    result = fuse(parents, images, FusionConfig(variant="gradient", level_init=level_init))
    # The stream is grouped once, each MLP's hidden layer on its own, the classes by index.
    expected = [
        "index" if level.name == "head.2" else "kmeans" if level.name.endswith("mlp.0") else "stream"
        for level in result.report.levels
    ]
    expected[0] = "kmeans"
    assert [level.grouping for level in result.report.levels] == expected
    assert result.report.mean_fit_r2 > 0.95
    assert_same_function(result.model, model, torch.rand(100, 1, 8, 8), tolerance=tolerance)


def test_the_fused_resnets_batchnorm_statistics_are_those_of_its_own_activations(
    images: torch.Tensor,
) -> None:
    parents = [trained_statistics(zoo_model("resnet8", seed), images) for seed in range(3)]
    fused = fuse(parents, images, GRADIENT).model
    inputs_seen: dict[nn.Module, torch.Tensor] = {}
    norms = [m for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]
    handles = [n.register_forward_pre_hook(lambda m, a: inputs_seen.__setitem__(m, a[0])) for n in norms]
    with torch.no_grad():
        eval_out = fused.eval()(images)
    for handle in handles:
        handle.remove()
    for norm in norms:
        seen = inputs_seen[norm]
        assert torch.allclose(norm.running_mean, seen.mean(dim=(0, 2, 3)), atol=1e-4)
        assert torch.allclose(norm.running_var, seen.var(dim=(0, 2, 3), unbiased=False), rtol=1e-3, atol=1e-5)
    with torch.no_grad():
        train_out = fused.train()(images)
    assert (train_out - eval_out).abs().max() < 0.01 * eval_out.abs().max()


@pytest.mark.parametrize("variant", ["linear", "gradient"])
def test_vgg11_fuses_with_either_variant(images: torch.Tensor, variant: str) -> None:
    parents = [zoo_model("vgg11-bn", seed, width_multiplier=0.25).eval() for seed in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 300 calibration rows for the head's fan-in: expected here
        result = fuse(parents, images, FusionConfig(variant=variant, epochs=3))
    assert len(result.report.levels) == 10
    assert result.model(images).shape == (300, 10)


@pytest.mark.slow
def test_fusing_independently_trained_resnets_beats_plain_averaging_by_a_wide_margin() -> None:
    """Four ResNet-8s from different inits on Dirichlet(0.5) shares of the digits: averaging collapses."""
    data = load_digits()
    labels = data.y.numpy()
    pool, calibration, evaluation = split_server_sets(labels, 300, 400, seed=0)
    parts = [pool[p] for p in dirichlet(labels[pool], 4, 0.5, seed=0)]
    clients = train_clients(data, parts, model="resnet8", init="independent", epochs=10, seed=0)
    cal, ev = data.subset(calibration), data.subset(evaluation)
    fused = fuse(clients.models, (cal.x, cal.y), GRADIENT).model
    averaged = zoo_model("resnet8")
    averaged.load_state_dict(
        average_state_dicts([m.state_dict() for m in clients.models], [len(p) for p in parts])
    )
    fused_accuracy = evaluate(fused, ev.x, ev.y)["accuracy"]
    averaged_accuracy = evaluate(averaged, ev.x, ev.y)["accuracy"]
    mean_parent = sum(evaluate(m, ev.x, ev.y)["accuracy"] for m in clients.models) / 4
    seen = f"fused {fused_accuracy:.3f}, averaged {averaged_accuracy:.3f}, mean parent {mean_parent:.3f}"
    assert fused_accuracy > averaged_accuracy + 0.4, seen
    assert fused_accuracy > mean_parent, seen
