"""Weight averaging and the logit ensemble."""

from __future__ import annotations

import pytest
import torch

from fedfuse.models import build_model
from simulations.baselines import average_state_dicts, ensemble_logits
from simulations.training import predict


def make(seed: int, name: str = "mlp") -> torch.nn.Module:
    return build_model(name, in_channels=1, image_size=8, num_classes=10, seed=seed)


def test_averaging_is_the_example_weighted_mean_of_every_entry() -> None:
    a, b = make(0).state_dict(), make(1).state_dict()
    averaged = average_state_dicts([a, b], [30, 10])
    assert averaged.keys() == a.keys()
    for key in a:
        torch.testing.assert_close(averaged[key], 0.75 * a[key] + 0.25 * b[key])


def test_averaging_identical_models_returns_that_model() -> None:
    state = make(0, "cnn-bn").state_dict()
    averaged = average_state_dicts([state, state, state], [1, 2, 3])
    for key in state:
        torch.testing.assert_close(averaged[key], state[key])


def test_integer_buffers_are_averaged_and_stay_integers() -> None:
    a, b = make(0, "cnn-bn").state_dict(), make(1, "cnn-bn").state_dict()
    key = next(k for k in a if k.endswith("num_batches_tracked"))
    a[key], b[key] = torch.tensor(10), torch.tensor(20)
    averaged = average_state_dicts([a, b], [1, 1])
    assert averaged[key].dtype == torch.int64 and int(averaged[key]) == 15


def test_averaged_state_dict_loads_into_the_architecture() -> None:
    model = make(2, "cnn-bn")
    model.load_state_dict(
        average_state_dicts([make(0, "cnn-bn").state_dict(), make(1, "cnn-bn").state_dict()], [1, 1])
    )


@pytest.mark.parametrize(
    ("weights", "message"),
    [([1.0], "got 1 weights for 2 state_dicts"), ([1.0, -1.0], "non-negative"), ([0, 0], "not all zero")],
)
def test_averaging_rejects_bad_weights(weights: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        average_state_dicts([make(0).state_dict(), make(1).state_dict()], weights)


def test_averaging_rejects_different_architectures() -> None:
    small = build_model("mlp", in_channels=1, image_size=8, num_classes=10, hidden=(32,))
    with pytest.raises(ValueError, match="state_dict 1 has keys that differ"):
        average_state_dicts([make(0).state_dict(), small.state_dict()], [1, 1])


def test_ensemble_is_the_mean_of_the_members_logits() -> None:
    models, x = [make(0), make(1), make(2)], torch.rand(20, 1, 8, 8)
    expected = sum(predict(m, x) for m in models) / 3
    torch.testing.assert_close(ensemble_logits(models, x), expected)


def test_averaging_rejects_same_keys_with_different_shapes() -> None:
    wide = build_model("mlp", in_channels=1, image_size=8, num_classes=10, hidden=(32, 64))
    with pytest.raises(ValueError, match=r"'1.weight': state_dict 1 has shape \[32, 64\]"):
        average_state_dicts([make(0).state_dict(), wide.state_dict()], [1, 1])
