"""Fusing convolutional models in channels-last memory format: faster, and changes no value."""

from __future__ import annotations

import importlib

import pytest
import torch

from fedfuse import FusionConfig, describe_levels, fuse
from fedfuse.models import build_model
from tests.user_models import QuickstartNet

fusion = importlib.import_module("fedfuse.fusion.fuse")  # the module, which the package's `fuse` shadows


def _resnets() -> tuple[list[torch.nn.Module], torch.Tensor]:
    parents = [
        build_model("resnet8", in_channels=1, image_size=8, num_classes=3, seed=seed, width=4).eval()
        for seed in (1, 2)
    ]
    return parents, torch.rand(96, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_a_forward_only_fusion_of_convolutions_runs_channels_last_and_returns_the_usual_format(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parents, images = _resnets()
    seen: list[bool] = []
    original = fusion.fuse_level

    def spy(index, level, context):  # type: ignore[no-untyped-def]
        weights = [p for p in context.parents[0].parameters() if p.dim() == 4]
        seen.append(all(w.is_contiguous(memory_format=torch.channels_last) for w in weights))
        seen.append(any(not w.is_contiguous() for w in weights))
        return original(index, level, context)

    monkeypatch.setattr(fusion, "fuse_level", spy)
    result = fuse(parents, images, FusionConfig())
    assert seen and all(seen)
    assert all(parameter.is_contiguous() for parameter in result.model.parameters())
    assert all(parameter.is_contiguous() for parent in parents for parameter in parent.parameters())


def test_the_memory_format_changes_no_prediction(monkeypatch: pytest.MonkeyPatch) -> None:
    parents, images = _resnets()
    fast = fuse(parents, images, FusionConfig()).model
    monkeypatch.setattr(fusion, "_runs_channels_last", lambda model, example: False)
    usual = fuse(parents, images, FusionConfig()).model
    with torch.no_grad():
        assert torch.allclose(fast(images), usual(images), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "config",
    [
        FusionConfig(variant="gradient", epochs=1),
        FusionConfig(importance="gradient_x_activation"),
        FusionConfig(sharpness_limit="parents"),
        FusionConfig(polish_epochs=1),
    ],
    ids=["gradient variant", "attribution", "sharpness", "polish"],
)
def test_fusions_that_run_backward_passes_keep_the_usual_format(config: FusionConfig) -> None:
    """torch 2.13's channels-last convolution backward can corrupt the heap off the main thread."""
    images = torch.randn(8, 3, 32, 32)
    plan = describe_levels(QuickstartNet(), images)
    assert fusion._forward_only(FusionConfig(), plan)
    assert not fusion._forward_only(config, plan)


def test_the_auto_variant_on_a_model_with_blocks_runs_backward_passes_so_keeps_the_usual_format() -> None:
    from fedfuse.models import build_model

    vit = build_model("vit", in_channels=1, image_size=8, num_classes=3, dim=16, depth=1)
    plan = describe_levels(vit, torch.rand(8, 1, 8, 8))
    assert not fusion._forward_only(FusionConfig(variant="auto"), plan)


def test_a_model_that_views_its_convolutions_output_is_fused_in_its_own_format() -> None:
    """Flower's quickstart Net flattens with ``view``, which a channels-last tensor refuses."""
    torch.manual_seed(0)
    images = torch.randn(64, 3, 32, 32)
    model = QuickstartNet().eval()
    assert not fusion._runs_channels_last(model, images[:8])
    assert all(parameter.is_contiguous() for parameter in model.parameters())
    fused = fuse([model, QuickstartNet().eval()], images).model
    assert fused(images).shape == (64, 10)
