"""The model zoo: shapes on the image sizes we use, and only layer kinds the fusion engine understands."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedfuse.models import MLP, MODEL_NAMES, LeNet, build_model

ALLOWED = (
    nn.Linear,
    nn.Conv2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.MaxPool2d,
    nn.Flatten,
    nn.Dropout,
)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(("channels", "size"), [(1, 8), (1, 28), (3, 32)])
def test_every_model_maps_images_to_one_logit_per_class(name: str, channels: int, size: int) -> None:
    model = build_model(name, in_channels=channels, image_size=size, num_classes=7, seed=0)
    logits = model(torch.rand(5, channels, size, size))
    assert logits.shape == (5, 7)


@pytest.mark.parametrize("name", ["mlp", "cnn", "lenet", "cnn-bn", "vgg11", "vgg11-bn"])
def test_every_chain_model_is_a_flat_sequential_of_allowed_kinds_with_no_reused_module(name: str) -> None:
    """The chain models; ResNet and ViT declare their levels (tests/test_models_architectures.py)."""
    options = {"dropout": 0.2} if name in ("mlp", "vgg11", "vgg11-bn") else {}
    model = build_model(name, in_channels=1, image_size=8, num_classes=10, **options)
    children = list(model.children())
    assert isinstance(model, nn.Sequential)
    assert all(isinstance(child, ALLOWED) for child in children), [type(c).__name__ for c in children]
    assert len({id(child) for child in children}) == len(children)
    assert all(conv.groups == 1 for conv in children if isinstance(conv, nn.Conv2d))


def test_batch_norm_variant_puts_a_batch_norm_directly_after_each_hidden_layer() -> None:
    children = list(build_model("cnn-bn", in_channels=1, image_size=8, num_classes=10).children())
    weighted = [i for i, child in enumerate(children) if isinstance(child, (nn.Linear, nn.Conv2d))]
    *hidden, output = weighted
    for i in hidden:
        expected = nn.BatchNorm2d if isinstance(children[i], nn.Conv2d) else nn.BatchNorm1d
        assert isinstance(children[i + 1], expected)
    assert output == len(children) - 1


def test_plain_cnn_and_mlp_have_no_batch_norm() -> None:
    for name in ("cnn", "mlp"):
        model = build_model(name, in_channels=1, image_size=8, num_classes=10)
        assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules())


def test_mlp_options_set_widths_batch_norm_and_dropout() -> None:
    model = MLP(64, 10, hidden=(32,), batch_norm=True, dropout=0.5)
    kinds = [type(child) for child in model.children()]
    assert kinds == [nn.Flatten, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout, nn.Linear]
    assert model[1].out_features == 32


def test_lenet_head_input_matches_the_pooled_feature_map() -> None:
    model = LeNet(in_channels=1, num_classes=10, image_size=28, channels=(4, 8), hidden=(16,))
    first_linear = next(m for m in model if isinstance(m, nn.Linear))
    assert first_linear.in_features == 8 * 7 * 7


def test_lenet_rejects_images_too_small_for_its_pooling() -> None:
    with pytest.raises(ValueError, match="image_size 4 is too small"):
        LeNet(image_size=4, channels=(6, 16, 32))


def test_same_seed_gives_same_initial_weights_and_different_seeds_differ() -> None:
    def weights(seed: int) -> torch.Tensor:
        model = build_model("mlp", in_channels=1, image_size=8, num_classes=10, seed=seed)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(weights(3), weights(3))
    assert not torch.equal(weights(3), weights(4))


def test_seeded_build_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_model("cnn", in_channels=1, image_size=8, num_classes=10, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_model_name_is_rejected_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet'.*'mlp'"):
        build_model("resnet", in_channels=1, image_size=8, num_classes=10)


def test_factory_passes_options_to_the_model() -> None:
    model = build_model("lenet", in_channels=3, image_size=32, num_classes=10, channels=(8,), hidden=())
    assert [type(c) for c in model.children()] == [nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Linear]
    assert model[0].in_channels == 3


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_non_positive_sizes_are_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        MLP(64, bad)  # type: ignore[arg-type]
