"""The guard: a model is worse than the previous one only when it loses significantly more calibration
samples than it wins (McNemar's paired test)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedfuse.fusion.calibration import CalibrationSet
from fedfuse.strategy.guard import REGRESSION_Z, compare

SAMPLES, CLASSES = 200, 4


class Lookup(nn.Module):
    """Predicts ``predictions[i]`` for the input ``i``: a classifier whose every answer is chosen."""

    def __init__(self, predictions: torch.Tensor) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.register_buffer("predictions", predictions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(self.predictions[x[:, 0].long()], CLASSES).float() * self.scale


LABELS = torch.arange(SAMPLES) % CLASSES
CALIBRATION = CalibrationSet((torch.arange(SAMPLES, dtype=torch.float32)[:, None], LABELS), batch_size=64)


def with_errors(wrong: range) -> Lookup:
    """A classifier right on every sample but those in ``wrong``."""
    predictions = LABELS.clone()
    predictions[list(wrong)] = (LABELS[list(wrong)] + 1) % CLASSES
    return Lookup(predictions)


def test_a_model_that_loses_far_more_samples_than_it_wins_is_worse():
    comparison = compare(with_errors(range(0, 10)), with_errors(range(5, 45)), CALIBRATION)
    assert (comparison.gained, comparison.lost) == (5, 35)
    assert comparison.previous_accuracy == pytest.approx(0.95)
    assert comparison.new_accuracy == pytest.approx(0.80)
    assert comparison.worse
    assert "0.800 against the previous model's 0.950" in comparison.describe()


def test_a_drop_within_the_paired_tests_noise_is_not_worse():
    # 12 lost against 6 won: a drop of 6 samples, under 2 standard deviations (2 * sqrt(18) = 8.5)
    comparison = compare(with_errors(range(0, 6)), with_errors(range(6, 18)), CALIBRATION)
    assert (comparison.gained, comparison.lost) == (6, 12)
    assert not comparison.worse


def test_the_same_drop_on_fewer_disagreements_is_worse():
    # 9 lost, none won: a drop of 9 against 2 * sqrt(9) = 6
    comparison = compare(with_errors(range(0, 0)), with_errors(range(0, 9)), CALIBRATION, z=REGRESSION_Z)
    assert (comparison.gained, comparison.lost) == (0, 9)
    assert comparison.worse


def test_a_model_as_good_or_better_is_never_worse():
    assert not compare(with_errors(range(0, 20)), with_errors(range(0, 20)), CALIBRATION).worse
    assert not compare(with_errors(range(0, 60)), with_errors(range(0, 2)), CALIBRATION).worse


def test_both_models_are_left_in_the_mode_they_came_in():
    previous, new = with_errors(range(3)).train(), with_errors(range(4)).eval()
    compare(previous, new, CALIBRATION)
    assert previous.training and not new.training


def test_comparing_without_labels_is_refused():
    with pytest.raises(ValueError, match="needs its labels"):
        compare(with_errors(range(0)), with_errors(range(0)), CalibrationSet(torch.zeros(8, 1), batch_size=4))
