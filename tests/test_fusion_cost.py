"""What a fusion costs: each model runs once per level from a checkpoint, residual blocks included, and
nothing changes for it."""

from __future__ import annotations

import importlib
import operator
from collections.abc import Callable

import pytest
import torch
from torch import nn

from fedfuse import FusionConfig, fuse
from fedfuse.fusion.reading import CHECKPOINT_VALUES
from tests.user_models import QuickstartNet, SmallResNet

# The module, not the function `fedfuse.fusion.fuse` that the package exports under the same name.
fuse_module = importlib.import_module("fedfuse.fusion.fuse")

BATCHES_OF_64 = FusionConfig(batch_size=64)


def _calls(
    parents: list[nn.Module],
    layer: Callable[[nn.Module], nn.Module],
    budget: int,
    monkeypatch: pytest.MonkeyPatch,
    calibration: tuple[torch.Tensor, torch.Tensor],
    config: FusionConfig = BATCHES_OF_64,
) -> tuple[int, nn.Module]:
    """How often ``layer`` of the parents runs in one fusion with checkpoints of ``budget`` values."""
    calls = [0]

    def count(*_: object) -> None:
        calls[0] += 1

    handles = [layer(parent).register_forward_hook(count) for parent in parents]  # copied with the parents
    monkeypatch.setattr(fuse_module, "CHECKPOINT_VALUES", budget)
    fused = fuse(parents, calibration, config).model
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
    first = operator.attrgetter("conv1")
    from_input, fused_from_input = _calls(parents, first, 0, monkeypatch, (INPUTS, LABELS))
    checkpointed, fused = _calls(parents, first, CHECKPOINT_VALUES, monkeypatch, (INPUTS, LABELS))
    assert checkpointed < from_input / 2  # 5 levels: the first layer no longer runs for every one
    with torch.no_grad():
        assert torch.equal(fused(INPUTS), fused_from_input(INPUTS))


def test_inside_a_residual_block_checkpoints_keep_the_block_input_for_the_shortcut(monkeypatch) -> None:
    # A checkpoint at the block's second conv holds the block's input too (the shortcut needs it), so
    # the block's later levels and its stream's grouping do not run the block's first conv again.
    parents = []
    for seed in range(3):
        torch.manual_seed(seed)
        parents.append(SmallResNet().eval())
    calibration = (INPUTS[:, :1, :16, :16], LABELS)
    block_conv = operator.attrgetter("layer2.0.conv1")
    from_input, fused_from_input = _calls(parents, block_conv, 0, monkeypatch, calibration)
    checkpointed, fused = _calls(parents, block_conv, CHECKPOINT_VALUES, monkeypatch, calibration)
    assert checkpointed < from_input / 3
    with torch.no_grad():
        assert torch.equal(fused(calibration[0]), fused_from_input(calibration[0]))


def test_the_gradient_variant_fits_a_streams_levels_to_the_values_its_grouping_pass_kept(monkeypatch) -> None:
    """Each level of a residual stream fits to the sum it completes. The stream's grouping pass keeps the
    parents' values there, and the gradient variant reads them as the linear variant does, instead of
    running the parents again for every level: the same fused model, in fewer runs of the block."""
    from fedfuse.fusion.context import FusionContext

    parents = []
    for seed in range(2):
        torch.manual_seed(seed)
        parents.append(SmallResNet().eval())
    calibration = (INPUTS[:96, :1, :16, :16], LABELS[:96])
    config = FusionConfig(batch_size=64, variant="gradient", epochs=1)
    block_conv = operator.attrgetter("layer1.0.conv2")
    kept, fused = _calls(parents, block_conv, CHECKPOINT_VALUES, monkeypatch, calibration, config)
    monkeypatch.setattr(FusionContext, "collecting_targets", lambda self, space: {})
    rerun, fused_rerunning = _calls(parents, block_conv, CHECKPOINT_VALUES, monkeypatch, calibration, config)
    assert kept < rerun
    with torch.no_grad():
        assert torch.equal(fused(calibration[0]), fused_rerunning(calibration[0]))


def test_the_grouping_cost_worked_in_chunks_of_neurons_equals_it_worked_at_once(monkeypatch) -> None:
    """`grouping_cost` holds a few chunks of points, not copies of all K·n: the same figure either way."""
    from fedfuse.fusion import clustering

    generator = torch.Generator().manual_seed(0)
    points = torch.randn(1000, 30, generator=generator, dtype=torch.float64)
    scales = torch.rand(1000, generator=generator, dtype=torch.float64) + 0.5
    shares = torch.zeros(1000, 40, dtype=torch.float64)
    shares[torch.arange(1000), torch.randint(0, 40, (1000,), generator=generator)] = 0.1
    scores, variances = torch.rand(1000, generator=generator, dtype=torch.float64), points.var(1)
    whole = clustering.grouping_cost(points * scales[:, None], variances, scores, shares)
    monkeypatch.setattr(clustering, "COST_CHUNK", 64)
    assert clustering.grouping_cost(points, variances, scores, shares, scales) == pytest.approx(
        whole, rel=1e-12
    )
