"""Suite-wide settings."""

import pytest
import torch

from simulations.datasets import load_digits


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests run tiny models: one thread is fastest (no thread hand-offs, no spinning when the machine is
    busy) and makes float sums, hence results, independent of the machine's core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits [N, 1, 8, 8], split by a fixed permutation: 1200 to train, 597 to test, as
    (x_train, y_train, x_test, y_test). Shared: never modify the tensors."""
    data = load_digits()
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    train_idx, test_idx = order[:1200], order[1200:]
    return data.x[train_idx], data.y[train_idx], data.x[test_idx], data.y[test_idx]
