"""Neuron importance scores (`fedfuse.fusion.importance`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fedfuse import FusionConfig, fuse
from fedfuse.fusion import targets
from fedfuse.fusion.calibration import CalibrationSet
from fedfuse.fusion.context import FusionContext
from fedfuse.fusion.importance import importance_scores
from fedfuse.fusion.levels import Point, Space
from fedfuse.fusion.tracing import tapped, trace
from fedfuse.models import build_model


def test_scoring_every_place_in_one_pass_gives_each_place_the_scores_it_gets_alone() -> None:
    model = build_model("cnn", in_channels=1, image_size=16, num_classes=4, seed=0).eval()
    generator = torch.Generator().manual_seed(0)
    calibration = CalibrationSet(
        (torch.randn(40, 1, 16, 16, generator=generator), torch.randint(0, 4, (40,), generator=generator)),
        batch_size=16,
    )
    graph = trace(model).graph
    layers = {
        node.name: model.get_submodule(str(node.target))
        for node in graph.nodes
        if node.op == "call_module"
        and isinstance(model.get_submodule(str(node.target)), nn.Conv2d | nn.Linear)
    }
    places = list(layers)
    widths = [layer.weight.shape[0] for layer in layers.values()]
    axes = [1] * len(places)

    forward, modules = tapped(model, graph, places)
    together = importance_scores(
        "gradient_x_activation", forward, modules, axes, widths, calibration, torch.float32, 1
    )
    for place, axis, width, scores in zip(places, axes, widths, together):
        alone_forward, alone = tapped(model, graph, [place])
        (expected,) = importance_scores(
            "gradient_x_activation", alone_forward, alone, [axis], [width], calibration, torch.float32, 1
        )
        torch.testing.assert_close(scores, expected)
    assert len(together) == len(places) >= 3
    assert not torch.allclose(together[0][: widths[-1]], together[-1])


def test_a_fusion_scoring_every_place_at_once_fuses_as_one_scoring_place_by_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parents = [
        build_model("cnn", in_channels=1, image_size=16, num_classes=4, seed=seed).eval() for seed in range(3)
    ]
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(64, 1, 16, 16, generator=generator)
    calibration = (inputs, torch.randint(0, 4, (64,), generator=generator))
    config = FusionConfig(importance="gradient_x_activation", seed=0)
    at_once = fuse(parents, calibration, config).model

    def alone(parent: nn.Module, point: Point, width: int, context: FusionContext) -> torch.Tensor:
        forward, modules = context.parent_reader.attribution_targets(parent, [point.place])
        (scores,) = importance_scores(
            "gradient_x_activation",
            forward,
            modules,
            [point.axis],
            [width],
            context.calibration,
            torch.float32,
            1,
        )
        return scores

    monkeypatch.setattr(targets, "_parent_scores", alone)
    place_by_place = fuse(parents, calibration, config).model
    with torch.no_grad():
        torch.testing.assert_close(at_once(inputs), place_by_place(inputs))


def test_a_parent_with_every_score_ten_times_larger_counts_no_more() -> None:
    point = Point("fc1", 1)
    space = Space("fc1", width=3, fixed=False, classes=False, levels=("fc1",), points=(point,))
    parents = [nn.Linear(1, 1), nn.Linear(1, 1)]
    own = [
        torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64),
        torch.tensor([3.0, 1.0, 1.0], dtype=torch.float64),
    ]

    def scores_of(first_scale: float) -> torch.Tensor:
        context = SimpleNamespace(
            config=FusionConfig(importance="gradient_x_activation"),
            parents=parents,
            importance={
                (id(parents[0]), "fc1"): own[0] * first_scale,
                (id(parents[1]), "fc1"): own[1],
            },
        )
        return targets._scores(space, context)  # type: ignore[arg-type]

    torch.testing.assert_close(scores_of(10.0), scores_of(1.0))
    torch.testing.assert_close(
        scores_of(1.0), torch.tensor([0.5, 1.0, 1.5, 1.8, 0.6, 0.6], dtype=torch.float64)
    )
