"""The peer methods FedFuse is compared with, each on a case whose answer is known: weight matching and
OT fusion must undo a shuffle of hidden neurons, RegMean must leave agreeing models alone, distillation
must pull its student toward the teachers' ensemble, and Flower's strategies must aggregate as Flower
defines them."""

from __future__ import annotations

from unittest.mock import Mock

import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from torch import nn

from fedfuse.models import build_model
from simulations.baselines import PEER_METHODS, PeerInputs, ensemble_logits, run_peer
from simulations.baselines.distillation import distill
from simulations.baselines.ot_fusion import ot_fusion
from simulations.baselines.regmean import regmean
from simulations.baselines.weight_matching import weight_matching_merge
from simulations.training import predict
from tests.permutation import permuted_copy, permuted_resnet_copy
from tests.user_models import InceptionNet

X = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def make(name: str, seed: int = 0) -> nn.Module:
    return build_model(name, in_channels=1, image_size=8, num_classes=10, seed=seed).eval()


def assert_same_weights(actual: nn.Module, expected: nn.Module) -> None:
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(actual.state_dict()[key], value, msg=f"{key} differs")


@pytest.mark.parametrize("name", ["cnn", "mlp", "cnn-bn"])
def test_weight_matching_recovers_permuted_copies_exactly(name: str) -> None:
    model = make(name)
    copies = [model, permuted_copy(model, 1, X), permuted_copy(model, 2, X), permuted_copy(model, 3, X)]
    assert_same_weights(weight_matching_merge(copies, X[:8], seed=0), model)


def test_weight_matching_follows_residual_streams() -> None:
    model = make("resnet8")
    assert_same_weights(weight_matching_merge([model, permuted_resnet_copy(model, 1)], X[:8], seed=0), model)


def test_weight_matching_aligns_before_averaging() -> None:
    """Two different models: the merge is the average of model 0 and model 1 permuted, not of the two as
    given (unless the best permutation happens to be the identity everywhere)."""
    a, b = make("cnn", 0), make("cnn", 1)
    merged = weight_matching_merge([a, b], X[:8], seed=0)
    plain = 0.5 * (a.state_dict()["0.weight"] + b.state_dict()["0.weight"])
    assert not torch.allclose(merged.state_dict()["0.weight"], plain)


def test_ot_fusion_of_permuted_copies_recovers_the_function() -> None:
    model = make("cnn-bn")
    copies = [model, permuted_copy(model, 1, X), permuted_copy(model, 2, X)]
    torch.testing.assert_close(predict(ot_fusion(copies, X), X), predict(model, X))


def test_ot_fusion_follows_residual_streams() -> None:
    model = make("resnet8")
    fused = ot_fusion([model, permuted_resnet_copy(model, 1)], X)
    torch.testing.assert_close(predict(fused, X), predict(model, X))


def test_regmean_of_identical_models_returns_the_model() -> None:
    model = make("cnn-bn")
    assert_same_weights(regmean([model, model, model], X), model)


def test_regmean_of_different_models_fits_each_layer_to_their_inputs() -> None:
    """A one-layer model: every client's input is the same X, so the Grams are equal and RegMean (alpha 1)
    reduces to the plain average of the weights."""
    a, b = nn.Sequential(nn.Linear(6, 3)), nn.Sequential(nn.Linear(6, 3))
    x = torch.randn(40, 6)
    merged = regmean([a, b], x, alpha=1.0)
    torch.testing.assert_close(merged[0].weight, (a[0].weight + b[0].weight) / 2)


def test_regmean_refuses_a_level_it_cannot_merge_by_name() -> None:
    vit = build_model("vit", in_channels=1, image_size=8, num_classes=10, seed=0)
    with pytest.raises(ValueError, match=r"RegMean merges Linear/Conv layers; ViT has level 'embed"):
        regmean([vit, vit], X)


def test_weight_matching_refuses_a_level_it_cannot_permute_by_name() -> None:
    vit = build_model("vit", in_channels=1, image_size=8, num_classes=10, seed=0)
    with pytest.raises(ValueError, match=r"Git Re-Basin weight matching re-indexes .* ViT has level"):
        weight_matching_merge([vit, vit], X[:8], seed=0)


def test_weight_matching_refuses_channels_concatenated_from_several_levels() -> None:
    model = InceptionNet().eval()
    with pytest.raises(ValueError, match=r"level 'dense' .* concatenates the channels of several levels"):
        weight_matching_merge([model, model], torch.randn(8, 1, 8, 8), seed=0)


def agreement(model: nn.Module, teachers: list[nn.Module]) -> float:
    return float((predict(model, X).argmax(1) == ensemble_logits(teachers, X).argmax(1)).float().mean())


def test_distillation_moves_the_student_toward_the_ensemble() -> None:
    teachers = [make("mlp", seed) for seed in range(3)]
    start = distill(teachers, X, seed=0, epochs=0)  # the uniform average, untrained
    student = distill(teachers, X, seed=0, epochs=30)
    assert agreement(student, teachers) > agreement(start, teachers) + 0.2
    assert agreement(student, teachers) > 0.8


def test_distillation_is_reproducible() -> None:
    teachers = [make("cnn", seed) for seed in range(2)]
    assert_same_weights(distill(teachers, X, seed=4, epochs=2), distill(teachers, X, seed=4, epochs=2))


def reply(model: nn.Module, examples: int) -> Mock:
    message = Mock(spec=Message)
    message.has_error.return_value = False
    message.content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": examples})}
    )
    return message


def test_flower_fedavg_is_the_example_weighted_mean() -> None:
    a, b = make("mlp", 0), make("mlp", 1)
    inputs = PeerInputs([a, b], (X, torch.zeros(64)), seed=0, replies=[reply(a, 30), reply(b, 10)])
    merged = run_peer("flwr-fedavg", inputs)
    torch.testing.assert_close(merged.state_dict()["1.weight"], 0.75 * a[1].weight + 0.25 * b[1].weight)


def test_flower_fedmedian_is_the_entrywise_median() -> None:
    models = [make("mlp", seed) for seed in range(3)]
    inputs = PeerInputs(models, (X, torch.zeros(64)), 0, [reply(m, 10) for m in models])
    merged = run_peer("flwr-fedmedian", inputs)
    expected = torch.stack([m[1].weight for m in models]).median(dim=0).values
    torch.testing.assert_close(merged.state_dict()["1.weight"], expected)


def test_flower_krum_picks_one_client() -> None:
    models = [make("mlp", seed) for seed in range(4)]
    inputs = PeerInputs(models, (X, torch.zeros(64)), 0, [reply(m, 10) for m in models])
    merged = run_peer("flwr-krum", inputs)
    assert any(torch.equal(merged[1].weight, m[1].weight) for m in models)


def test_flower_strategies_leave_the_replies_as_they_came() -> None:
    models = [make("mlp", seed) for seed in range(3)]
    replies = [reply(m, 10) for m in models]
    for name in ("flwr-fedmedian", "flwr-fedtrimmedavg", "flwr-fedavg"):
        run_peer(name, PeerInputs(models, (X, torch.zeros(64)), 0, replies))
    for message, model in zip(replies, models):
        torch.testing.assert_close(message.content["arrays"].to_torch_state_dict(), model.state_dict())


def test_flower_strategies_need_the_replies() -> None:
    with pytest.raises(ValueError, match="flwr-fedmedian aggregates the clients' Flower replies"):
        run_peer("flwr-fedmedian", PeerInputs([make("mlp")], (X, torch.zeros(64)), 0))


def test_an_unknown_peer_method_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown peer method 'fedma'; choose from git-rebasin"):
        run_peer("fedma", PeerInputs([make("mlp")], (X, torch.zeros(64)), 0))


def test_every_model_merging_method_returns_the_architecture() -> None:
    models = [make("cnn", seed) for seed in range(2)]
    inputs = PeerInputs(models, (X, torch.zeros(64, dtype=torch.long)), 0, [reply(m, 5) for m in models])
    for name in PEER_METHODS:
        merged = run_peer(name, inputs)
        assert merged.state_dict().keys() == models[0].state_dict().keys(), name
        assert predict(merged, X).shape == (64, 10), name
