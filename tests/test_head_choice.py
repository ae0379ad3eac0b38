"""``output_target="auto"``: the output layer's target chosen by cross-validation on the calibration set."""

from __future__ import annotations

import torch
from torch import nn

from fedfuse import FusionConfig, fuse
from fedfuse.fusion.head_choice import CANDIDATES, choose_head


def _features_and_labels(samples: int = 300, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(samples) % classes
    features = torch.randn(samples, 12, generator=generator, dtype=torch.float64)
    features[:, :classes] += 3.0 * nn.functional.one_hot(labels, classes)
    return features, labels


def test_the_target_that_classifies_held_out_samples_best_is_chosen() -> None:
    features, labels = _features_and_labels()
    informative = 4.0 * nn.functional.one_hot(labels, 4).double()
    noise = torch.randn(len(labels), 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for good in ("labels", "logits"):
        targets = {name: informative if name == good else noise for name in CANDIDATES}
        choice = choose_head(features, targets, labels, ridge=0.01, with_bias=True, prior=None)
        assert choice.target == good
        assert choice.accuracy[good] > 0.9 > max(a for name, a in choice.accuracy.items() if name != good)


def test_a_tie_goes_to_the_labels() -> None:
    features, labels = _features_and_labels()
    same = 4.0 * nn.functional.one_hot(labels, 4).double()
    choice = choose_head(features, dict.fromkeys(CANDIDATES, same), labels, 0.01, True, None)
    assert choice.target == "labels"


def test_fusion_with_auto_fits_the_head_as_the_chosen_target_would_and_reports_the_choice() -> None:
    torch.manual_seed(0)
    parents = [nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)).eval() for _ in range(3)]
    inputs = torch.randn(240, 10)
    calibration = (inputs, parents[0](inputs).argmax(1).detach())
    auto = fuse(parents, calibration, FusionConfig(output_target="auto"))
    head = auto.report.levels[-1]
    assert head.output_target in CANDIDATES and set(head.target_accuracy) == set(CANDIDATES)
    fixed = fuse(parents, calibration, FusionConfig(output_target=head.output_target))
    torch.testing.assert_close(auto.model[2].weight, fixed.model[2].weight)
    assert fixed.report.levels[-1].output_target is None


def test_without_labels_auto_fits_the_parents_logits() -> None:
    torch.manual_seed(0)
    parents = [nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)).eval() for _ in range(2)]
    inputs = torch.randn(120, 10)
    auto = fuse(parents, inputs, FusionConfig(output_target="auto"))
    logits = fuse(parents, inputs, FusionConfig(output_target="logits"))
    torch.testing.assert_close(auto.model[2].weight, logits.model[2].weight)


def test_the_labels_give_way_only_to_a_target_significantly_better_on_held_out_samples() -> None:
    features, labels = _features_and_labels()
    clean = 4.0 * nn.functional.one_hot(labels, 4).double()
    generator = torch.Generator().manual_seed(2)

    def corrupted(share: float) -> torch.Tensor:
        wrong = torch.rand(len(labels), generator=generator) < share
        noisy = labels.clone()
        noisy[wrong] = (labels[wrong] + 1) % 4
        return 4.0 * nn.functional.one_hot(noisy, 4).double()

    slightly = {"labels": corrupted(0.02), "logits": clean, "log_probabilities": corrupted(0.02)}
    assert choose_head(features, slightly, labels, 0.01, True, None).target == "labels"
    much = {"labels": corrupted(0.45), "logits": clean, "log_probabilities": corrupted(0.45)}
    assert choose_head(features, much, labels, 0.01, True, None).target == "logits"
