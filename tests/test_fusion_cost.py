"""What a fusion costs: each model runs once per level from a checkpoint, and nothing changes for it."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from fedfuse import FusionConfig, fuse
from fedfuse.fusion.reading import CHECKPOINT_VALUES
from tests.user_models import QuickstartNet

# The module, not the function `fedfuse.fusion.fuse` that the package exports under the same name.
fuse_module = importlib.import_module("fedfuse.fusion.fuse")


def _first_layer_calls(
    parents: list[nn.Module], budget: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, nn.Module]:
    calls = [0]

    def count(*_: object) -> None:
        calls[0] += 1

    handles = [parent.conv1.register_forward_hook(count) for parent in parents]  # copied with the parents
    monkeypatch.setattr(fuse_module, "CHECKPOINT_VALUES", budget)
    fused = fuse(parents, (INPUTS, LABELS), FusionConfig(batch_size=64)).model
    for handle in handles:
        handle.remove()
    return calls[0], fused


INPUTS = torch.rand(192, 3, 32, 32, generator=torch.Generator().manual_seed(0))
LABELS = torch.randint(0, 10, (192,), generator=torch.Generator().manual_seed(1))


def test_checkpoints_run_the_first_layer_once_per_level_and_fuse_the_same_model(monkeypatch) -> None:
    parents = []
    for seed in range(3):
        torch.manual_seed(seed)
        parents.append(QuickstartNet().eval())
    from_input, fused_from_input = _first_layer_calls(parents, 0, monkeypatch)
    checkpointed, fused = _first_layer_calls(parents, CHECKPOINT_VALUES, monkeypatch)
    assert checkpointed < from_input / 2  # 5 levels: the first layer no longer runs for every one
    with torch.no_grad():
        assert torch.equal(fused(INPUTS), fused_from_input(INPUTS))
