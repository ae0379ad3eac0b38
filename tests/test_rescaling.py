"""The fused model's free layer scales: chosen like the parents' sizes, never changing what it computes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedfuse import FusionConfig, describe_levels, fuse
from fedfuse.fusion import rescaling
from fedfuse.fusion.rescaling import Rescalable, log_scales, rescalable_spaces
from tests.test_fusion_recovers_functions import assert_same_function
from tests.user_models import QuickstartNet, SmallResNet


def _chain(activation: type[nn.Module] = nn.ReLU, batch_norm: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(12, 32)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(32))
    layers += [activation(), nn.Linear(32, 24), activation(), nn.Linear(24, 5)]
    return nn.Sequential(*layers)


def _different_parents(build, count: int = 3) -> list[nn.Module]:
    parents = []
    for seed in range(count):
        torch.manual_seed(seed)
        parent = build().eval()
        layers = [m for m in parent.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        with torch.no_grad():  # the same function with its first layer 4**seed times larger: the fused
            # first layer is sized like the parents' mean, and the second must shrink below theirs
            layers[0].weight.mul_(4.0**seed)
            layers[0].bias.mul_(4.0**seed)
            layers[1].weight.div_(4.0**seed)
        parents.append(parent)
    return parents


def _ratios(result) -> list[float]:
    return [level.weight_norm / level.parent_weight_norm for level in result.report.levels]


def test_log_scales_bring_every_layer_of_a_chain_to_the_geometric_mean_of_the_size_ratios() -> None:
    chain = [Rescalable("a", "a", ("b",)), Rescalable("b", "b", ("c",))]
    ratios = {"a": 4.0, "b": 1.0, "c": 2.0}
    scales = log_scales(chain, ratios)
    out = {"a": scales["a"], "b": scales["b"] - scales["a"], "c": -scales["b"]}
    mean = math.log(8.0) / 3
    for name, shift in out.items():
        assert math.log(ratios[name]) + shift == pytest.approx(mean)


def test_rescaling_keeps_the_fused_function_and_sizes_every_layer_alike_against_its_parents() -> None:
    parents = _different_parents(_chain)
    calibration = torch.randn(300, 12)
    unscaled = fuse(parents, calibration, config=FusionConfig(rescale="none"))
    rescaled = fuse(parents, calibration, config=FusionConfig())
    assert_same_function(rescaled.model, unscaled.model, torch.randn(200, 12), 1e-5)
    before, after = _ratios(unscaled), _ratios(rescaled)
    assert max(before) / min(before) > 1.5  # the fits left the layers unevenly sized
    assert after == pytest.approx([math.prod(before) ** (1 / len(before))] * len(before), rel=1e-6)


def test_flowers_quickstart_net_is_rescaled_through_its_pooling_and_view() -> None:
    parents = _different_parents(QuickstartNet)
    calibration = torch.randn(64, 3, 32, 32)
    spaces = rescalable_spaces(describe_levels(parents[0], calibration[:4]), parents[0])
    assert [(s.writer, s.readers) for s in spaces] == [
        ("conv1", ("conv2",)),
        ("conv2", ("fc1",)),
        ("fc1", ("fc2",)),
        ("fc2", ("fc3",)),
    ]
    unscaled = fuse(parents, calibration, config=FusionConfig(rescale="none"))
    rescaled = fuse(parents, calibration, config=FusionConfig())
    assert_same_function(rescaled.model, unscaled.model, torch.randn(32, 3, 32, 32), 1e-5)
    assert max(_ratios(rescaled)) == pytest.approx(min(_ratios(rescaled)), rel=1e-6)


@pytest.mark.parametrize("activation", [nn.Tanh, nn.GELU, nn.Sigmoid, nn.ReLU6])
def test_a_layer_read_through_an_activation_that_is_not_homogeneous_keeps_its_scale(activation) -> None:
    model = _chain(activation)
    assert rescalable_spaces(describe_levels(model, torch.randn(4, 12)), model) == []


def test_a_layer_with_batchnorm_after_it_keeps_its_scale_and_is_rescaled_only_as_a_reader() -> None:
    model = _chain(batch_norm=True).eval()
    spaces = rescalable_spaces(describe_levels(model, torch.randn(4, 12)), model)
    assert [(s.writer, s.readers) for s in spaces] == [("3", ("5",))]


def test_a_residual_stream_written_by_several_layers_keeps_its_scale() -> None:
    model = SmallResNet().eval()
    plan = describe_levels(model, torch.randn(4, 1, 16, 16))
    streams = {name for name, space in plan.spaces.items() if len(space.levels) > 1}
    assert streams
    assert not {s.space for s in rescalable_spaces(plan, model)} & streams


def test_a_rescaling_that_would_change_the_outputs_is_undone(monkeypatch) -> None:
    parents = _different_parents(lambda: _chain(nn.Tanh))
    calibration = torch.randn(300, 12)
    unscaled = fuse(parents, calibration, config=FusionConfig(rescale="none"))
    monkeypatch.setattr(rescaling, "HOMOGENEOUS_MODULES", (*rescaling.HOMOGENEOUS_MODULES, nn.Tanh))
    checked = fuse(parents, calibration, config=FusionConfig())
    assert _ratios(checked) == _ratios(unscaled)
    assert_same_function(checked.model, unscaled.model, torch.randn(200, 12), 1e-7)
