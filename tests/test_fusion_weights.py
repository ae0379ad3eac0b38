"""Fusion with nothing disclosed by the clients: class weights measured on the calibration set, fits pulled
toward the parents' aligned weights (the fused model stays the parents' size and keeps their knowledge outside
the calibration span), and a result that does not depend on the parents' order."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from fedfuse import FusionConfig, fuse
from fedfuse.fusion.calibration import CalibrationSet
from fedfuse.fusion.parent_scores import score_parents
from fedfuse.fusion.weights import calibrated_weights
from simulations.calibration_privacy import energy_outside_span
from simulations.training import evaluate, train


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def specialists(digits_split) -> tuple[list[nn.Module], tuple[torch.Tensor, torch.Tensor], tuple]:
    """Three MLPs from independent inits, each trained on digits of a few classes only (strongly non-IID),
    a class-balanced calibration set of 200 and the held-out test digits."""
    x, y, x_test, y_test = digits_split
    classes = [(0, 1, 2, 3), (3, 4, 5, 6), (6, 7, 8, 9)]
    parents = []
    for seed, own in enumerate(classes):
        mask = torch.isin(y[:1000], torch.tensor(own))
        model = mlp(seed)
        train(model, x[:1000][mask], y[:1000][mask], epochs=30, seed=seed)
        parents.append(model.eval())
    calibration = (x[1000:1200], y[1000:1200])
    return parents, calibration, (x_test, y_test)


def accuracy(model: nn.Module, test: tuple) -> float:
    return evaluate(model, *test)["accuracy"]


def test_calibration_weights_give_each_class_to_the_parents_that_know_it(specialists) -> None:
    parents, calibration, _ = specialists
    scores = score_parents(parents, CalibrationSet(calibration, 256), 10, torch.device("cpu"), torch.float32)
    weights = calibrated_weights(scores, sharpness=2.0).classes
    assert torch.allclose(weights.sum(0), torch.ones(10, dtype=torch.float64))
    assert weights[0, :3].min() > 0.9 and weights[2, 7:].min() > 0.9  # classes only one parent knows
    assert weights[:, 3].argmax() in (0, 1) and weights[2, 3] < 0.1  # class 3: the two that saw it


def test_a_class_the_calibration_set_lacks_gives_every_parent_an_equal_say(specialists) -> None:
    parents, (x, y), _ = specialists
    keep = y != 9
    scores = score_parents(
        parents, CalibrationSet((x[keep], y[keep]), 256), 10, torch.device("cpu"), torch.float32
    )
    weights = calibrated_weights(scores, sharpness=2.0).classes
    assert torch.allclose(weights[:, 9], torch.full((3,), 1 / 3, dtype=torch.float64))


def test_calibration_class_weights_mend_the_logit_average_of_non_iid_clients(specialists) -> None:
    """Fitted to the parents' logits, a uniform average lets a parent that never saw class c vote on c,
    confidently; the calibration weights give c to the parents that know it, nothing asked of the clients."""
    parents, calibration, test = specialists
    logits = FusionConfig(output_target="logits")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weighted = fuse(parents, calibration, logits).model
        uniform = fuse(
            parents, calibration, FusionConfig(output_target="logits", class_weights="uniform")
        ).model
    assert accuracy(weighted, test) > accuracy(uniform, test) + 0.1


def test_by_default_the_fused_model_is_far_above_every_client(specialists) -> None:
    """The default fits the classes to the calibration labels on the fused features: one model well above
    each specialist (measured: about 0.90 against clients at 0.36-0.41)."""
    parents, calibration, test = specialists
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = fuse(parents, calibration).model
    assert accuracy(fused, test) > max(accuracy(parent, test) for parent in parents) + 0.3


@pytest.mark.parametrize("variant", ["linear", "gradient"])
def test_permuting_the_parents_changes_no_prediction(specialists, variant: str) -> None:
    parents, calibration, (x_test, _) = specialists
    config = FusionConfig(variant=variant, epochs=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = fuse(parents, calibration, config).model
        second = fuse([parents[2], parents[0], parents[1]], calibration, config).model
    with torch.no_grad():
        torch.testing.assert_close(first(x_test), second(x_test), rtol=0, atol=1e-6)


def test_the_fits_are_pulled_toward_the_parents_not_toward_zero(specialists) -> None:
    """With 10 calibration images (fewer than the 65 inputs of the first layer), the paper's minimum-norm
    fit puts every fused first-layer row in the span of those images (any client could rebuild them from
    the fused weights); pulled toward the parents' aligned weights, the rows lie outside it as a client's
    do, and the fused weights stay the parents' size."""
    parents, (x, y), _ = specialists
    few = (x[:10], y[:10])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 10 rows for a fan-in of 65: underdetermined on purpose
        toward_parents = fuse(parents, few)
        toward_zero = fuse(parents, few, FusionConfig(prior="zero", ridge=0.0))
    client = min(energy_outside_span(parent[1].weight, few[0]) for parent in parents)
    assert energy_outside_span(toward_zero.model[1].weight, few[0]) < 1e-9
    assert energy_outside_span(toward_parents.model[1].weight, few[0]) > 0.5 * client
    for level in toward_parents.report.levels:
        assert level.weight_norm < 3 * level.parent_weight_norm, (level.name, level.weight_norm)


def test_a_polish_mends_a_poor_fused_model_and_never_leaves_it_worse(specialists) -> None:
    """Fitted to uniformly averaged logits, the specialists' fused model is poor; a few epochs of polish on
    the calibration set mend it. The default fused model is already as good as the held-out loss can
    tell, and the polish then keeps its weights (the best held-out epoch is the start)."""
    parents, calibration, test = specialists
    poor = FusionConfig(output_target="logits", class_weights="uniform")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unpolished = fuse(parents, calibration, poor).model
        polished = fuse(parents, calibration, FusionConfig(**{**poor.to_dict(), "polish_epochs": 30})).model
        default = fuse(parents, calibration).model
        kept = fuse(parents, calibration, FusionConfig(polish_epochs=30)).model
    assert accuracy(polished, test) > accuracy(unpolished, test) + 0.3
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), kept.state_dict().values()))
