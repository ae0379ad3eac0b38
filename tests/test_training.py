"""Local training and evaluation: it learns, it is reproducible, and the scores mean what they say."""

from __future__ import annotations

import copy

import pytest
import torch

from fedfuse.models import build_model
from simulations.training import classification_scores, evaluate, predict, train


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models train fastest on one thread; several stall badly when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().flatten().float() for t in model.state_dict().values()])


@pytest.mark.parametrize("name", ["mlp", "cnn-bn"])
def test_a_few_epochs_on_digits_lift_accuracy_far_above_chance(digits_split, name: str) -> None:
    x, y, x_test, y_test = digits_split
    model = build_model(name, in_channels=1, image_size=8, num_classes=10, seed=0)
    before = evaluate(model, x_test, y_test)["accuracy"]
    train(model, x, y, epochs=3, seed=0)
    after = evaluate(model, x_test, y_test)
    assert before < 0.3 and after["accuracy"] > 0.85 and after["macro_f1"] > 0.85


def test_same_seed_gives_identical_weights_and_another_seed_different_ones(digits_split) -> None:
    x, y, _, _ = digits_split

    def trained(seed: int) -> torch.Tensor:
        model = build_model("mlp", in_channels=1, image_size=8, num_classes=10, seed=0, dropout=0.3)
        train(model, x[:300], y[:300], epochs=2, seed=seed)
        return weights(model)

    assert torch.equal(trained(5), trained(5))
    assert not torch.equal(trained(5), trained(6))


def test_training_leaves_the_global_rng_alone(digits_split) -> None:
    x, y, _, _ = digits_split
    torch.manual_seed(0)
    expected = torch.rand(3)
    model = build_model("mlp", in_channels=1, image_size=8, num_classes=10, seed=0, dropout=0.5)
    torch.manual_seed(0)
    train(model, x[:64], y[:64], epochs=1, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_batch_norm_model_trains_when_a_batch_of_one_would_be_left_over(digits_split) -> None:
    x, y, _, _ = digits_split
    model = build_model("cnn-bn", in_channels=1, image_size=8, num_classes=10, seed=0)
    train(model, x[:33], y[:33], epochs=1, batch_size=32, seed=0)
    assert torch.isfinite(weights(model)).all()


def test_train_rejects_mismatched_inputs_and_labels(digits_split) -> None:
    x, y, _, _ = digits_split
    model = build_model("mlp", in_channels=1, image_size=8, num_classes=10)
    with pytest.raises(ValueError, match="10 inputs, 9 labels"):
        train(model, x[:10], y[:9], epochs=1, seed=0)


def test_fedproxs_proximal_term_keeps_the_weights_near_where_training_started(digits_split) -> None:
    x, y, _, _ = digits_split
    start = build_model("mlp", in_channels=1, image_size=8, num_classes=10, seed=0)
    anchor = weights(start)

    def distance(mu: float) -> float:
        model = copy.deepcopy(start)
        train(model, x[:300], y[:300], epochs=3, seed=0, proximal_mu=mu)
        return float((weights(model) - anchor).norm())

    plain, pulled, strong = distance(0.0), distance(0.1), distance(10.0)
    assert strong < pulled < plain
    assert strong < 0.5 * plain  # a strong pull keeps the model close, not merely a little closer


def test_a_zero_proximal_mu_is_plain_training_and_a_negative_one_is_refused(digits_split) -> None:
    x, y, _, _ = digits_split

    def trained(**extra: float) -> torch.Tensor:
        model = build_model("mlp", in_channels=1, image_size=8, num_classes=10, seed=0)
        train(model, x[:100], y[:100], epochs=1, seed=0, **extra)
        return weights(model)

    assert torch.equal(trained(), trained(proximal_mu=0.0))
    with pytest.raises(ValueError, match="proximal_mu >= 0"):
        trained(proximal_mu=-1.0)


def test_predict_returns_logits_in_eval_mode_and_restores_the_mode(digits_split) -> None:
    x, _, _, _ = digits_split
    model = build_model("mlp", in_channels=1, image_size=8, num_classes=10, seed=0, dropout=0.5)
    model.train()
    first, second = predict(model, x[:50], batch_size=16), predict(model, x[:50])
    assert first.shape == (50, 10) and torch.allclose(first, second, atol=1e-5)  # no dropout noise
    assert model.training


def test_scores_of_known_predictions() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]])
    scores = classification_scores(logits, torch.tensor([0, 1, 1, 1]))
    assert scores["accuracy"] == pytest.approx(0.5)
    # class 0: precision 1/3, recall 1 -> F1 0.5; class 1: precision 1, recall 1/3 -> F1 0.5
    assert scores["macro_f1"] == pytest.approx(0.5)
    assert scores["loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 1, 1])).item()
    )
