"""OT fusion, activation-based (Singh & Jaggi, "Model Fusion via Optimal Transport", NeurIPS 2020).

Each client model is aligned to an anchor (model 0), space by space: every neuron is described by its
activations on the server's calibration inputs, the ground cost between two neurons is the squared
Euclidean distance of those activations, and the transport plan between the anchor's neurons and the
model's (uniform masses: exact optimal transport, solved by POT's ``ot.emd``) says how the model's
neurons map onto the anchor's. The model's weights are then re-indexed by that plan on both sides of
every layer (`simulations.baselines.alignment`; the paper's ``W·T·diag(1/β)`` correction), and the aligned
models are averaged uniformly. The calibration labels are not used.

With equal widths and uniform masses the plan is a permutation scaled by 1/n wherever the activations
tell the neurons apart, so fusing exact permuted copies gives back the model's function.

Activations are read where the fusion engine reads a space's neurons (`fedfuse.fusion.reading.Reader` at
the space's points: each writing level's output and, for a residual stream, each sum), the rows of every
point stacked: one row per calibration example and position.
"""

from __future__ import annotations

from collections.abc import Sequence

import ot
import torch
from torch import Tensor, nn

from fedfuse.fusion.levels import LevelPlan
from fedfuse.fusion.reading import Reader
from fedfuse.fusion.statistics import rows_of
from simulations.baselines.alignment import alignable_plan, aligned_model, free_spaces
from simulations.baselines.averaging import average_state_dicts


def ot_fusion(models: Sequence[nn.Module], x: Tensor) -> nn.Module:
    """The uniform average of ``models`` after each is aligned to model 0 by optimal transport of its
    neurons' activations on ``x``.

    Args:
        models: K >= 1 models of one architecture whose levels are all Linear/Conv layers.
        x: the calibration inputs ``[N, ...]`` (labels unused); all N are read at once.

    Raises:
        ValueError: no models, or a level OT fusion cannot re-index (named).
    """
    if not models:
        raise ValueError("OT fusion needs at least one model")
    plan = alignable_plan(models[0], x[:8], "OT fusion")
    reader = Reader(plan)
    anchor = _activations(models[0], plan, reader, x)
    aligned = [models[0]]
    for model in models[1:]:
        activations = _activations(model, plan, reader, x)
        maps = {space: transport_map(anchor[space], activations[space]) for space in anchor}
        aligned.append(aligned_model(model, plan, maps))
    fused = aligned_model(models[0], plan, {})
    fused.load_state_dict(average_state_dicts([m.state_dict() for m in aligned], [1.0] * len(aligned)))
    return fused.eval()


def transport_map(anchor: Tensor, model: Tensor) -> Tensor:
    """``[n, n]`` float64: the exact optimal transport plan (``ot.emd``, uniform masses) from the anchor's
    neurons (rows of ``anchor``, ``[n, features]``) to the model's, with squared Euclidean ground cost,
    scaled by n so that each row sums to 1 (a permutation matrix when the plan is one)."""
    n = anchor.shape[0]
    cost = torch.cdist(anchor.double(), model.double()).square().numpy()
    uniform = torch.full((n,), 1.0 / n, dtype=torch.float64).numpy()
    plan = ot.emd(uniform, uniform, cost)
    return torch.as_tensor(plan, dtype=torch.float64) * n


@torch.no_grad()
def _activations(model: nn.Module, plan: LevelPlan, reader: Reader, x: Tensor) -> dict[str, Tensor]:
    """Per free space, ``[n, features]``: each neuron's values at the space's points on ``x``."""
    spaces = free_spaces(plan)
    points = [point for space in spaces for point in plan.spaces[space].points]
    values = reader.read(model.eval(), x, [point.place for point in points])
    by_place = {point.place: rows_of(value, point.axis).T for point, value in zip(points, values)}
    return {
        space: torch.cat([by_place[point.place] for point in plan.spaces[space].points], dim=1)
        for space in spaces
    }
