"""The fused model's layer sizes, rescaled toward the parents' without changing what it computes.

A ReLU network has a free scale per hidden layer: multiply a layer's weights and bias by c > 0 and the
weights of every layer reading it by 1 / c, and each output is the same (ReLU, max and average pooling,
flattening and dropout are positively homogeneous: f(c·x) = c·f(x)). Fusion fixes that scale by accident:
a fused layer that reads few fused channels standing for many parent channels, or whose fit is
underdetermined, can come out several times its parents' size while the next one comes out smaller.
Among the function-equivalent rescalings this pass picks the one whose layers are each as near their
parents' mean size as can be, in log scale: for layer l with size ratio ρ_l (fused norm over the parents'
mean) and log scale u_s per rescalable space s, it minimises Σ_l (log ρ_l + u_out(l) − u_in(l))². Along a
chain from the input to the classes the ratios' product cannot change, so every layer ends at their
geometric mean. Clients of a next round then start from weights the size of their own, layer by layer.

Only what is exact is rescaled: a space written by one Linear/convolution with no BatchNorm after it (a
BatchNorm would undo the scale), read only by Linear/convolution levels, through operations that are
positively homogeneous (`HOMOGENEOUS_MODULES`, `HOMOGENEOUS_FUNCTIONS`, `HOMOGENEOUS_METHODS`). Every
other space keeps its scale, and the rescaled model's outputs are checked against the fitted model's on a
calibration batch (`check_unchanged`).

The rescaling symmetry of ReLU networks and balancing it are from Neyshabur, Salakhutdinov and Srebro,
"Path-SGD" (2015), and Stock et al., "Equi-normalization of neural networks" (2019); this is a per-layer
version whose target is the parents' sizes, not equal norms.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from fedfuse.fusion.levels import Level, LevelPlan
from fedfuse.fusion.report import LevelReport

# --- positively homogeneous operations (of degree 1 in the tensor they pass on), as data ----------------
HOMOGENEOUS_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Flatten, nn.Unflatten, nn.ZeroPad1d, nn.ZeroPad2d,
    nn.ZeroPad3d,
)  # fmt: skip
HOMOGENEOUS_FUNCTIONS: frozenset[Callable] = frozenset({
    F.relu, torch.relu, F.leaky_relu, F.dropout, F.dropout1d, F.dropout2d, F.max_pool1d, F.max_pool2d,
    F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, torch.max_pool1d, torch.max_pool2d, torch.avg_pool1d,
    torch.adaptive_avg_pool1d, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.mean,
    torch.sum, torch.amax, operator.getitem,
})  # fmt: skip
HOMOGENEOUS_METHODS: frozenset[str] = frozenset({
    "relu", "clone", "contiguous", "view", "reshape", "flatten", "squeeze", "unsqueeze", "permute",
    "transpose", "mean", "sum", "amax",
})  # fmt: skip
#: Methods that read only a tensor's shape: their users never see its values.
SHAPE_METHODS: frozenset[str] = frozenset({"size", "dim"})
#: The kinds of level whose weights hold the scale (a Linear or a convolution).
SCALED_KINDS = frozenset({"linear", "conv1d", "conv2d"})
#: Largest change of the fused model's outputs, relative to their largest magnitude, that a rescaling
#: may make on a calibration batch (float round-off of float32 weights is about 1e-6).
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Rescalable:
    """A space whose scale is free: the level that writes it and the levels that read it."""

    space: str
    writer: str
    readers: tuple[str, ...]


def rescalable_spaces(plan: LevelPlan, model: nn.Module) -> list[Rescalable]:
    """The spaces of a traced ``plan`` that can be rescaled exactly (see the module docstring), in level
    order. A declared plan (no graph) has none: what lies between its levels is not known."""
    if plan.graph is None:
        return []
    nodes = {node.name: node for node in plan.graph.nodes}
    by_name = {level.name: level for level in plan.levels}
    readers_at = {level.layer: level for level in plan.levels if level.kind in SCALED_KINDS}
    found = []
    for space in plan.spaces.values():
        if space.fixed or space.classes or len(space.levels) != 1:
            continue
        writer = by_name[space.levels[0]]
        if writer.kind not in SCALED_KINDS or writer.norm is not None or writer.output not in nodes:
            continue
        readers = _readers(nodes[writer.output], model, readers_at)
        if readers and all(r.source == space.name and not r.concatenated for r in readers):
            found.append(Rescalable(space.name, writer.name, tuple(r.name for r in readers)))
    return found


def _readers(start: fx.Node, model: nn.Module, readers_at: dict[str | None, Level]) -> list[Level] | None:
    """The levels that ``start``'s value reaches through homogeneous operations only; None when it
    reaches anything else (another operation, the model's output)."""
    readers: dict[str, Level] = {}
    frontier, seen = [start], {start}
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_module" and user.target in readers_at:
                if user.args[:1] != (node,):
                    return None  # read as something other than the layer's input
                level = readers_at[user.target]
                readers[level.name] = level
            elif user.op == "call_method" and user.target in SHAPE_METHODS:
                continue
            elif _homogeneous(user, model):
                frontier.append(user)
            else:
                return None
    return list(readers.values())


def _homogeneous(node: fx.Node, model: nn.Module) -> bool:
    if node.op == "call_module":
        module = model.get_submodule(str(node.target))
        return type(module) in HOMOGENEOUS_MODULES
    if node.op == "call_function":
        return node.target in HOMOGENEOUS_FUNCTIONS
    if node.op == "call_method":
        return node.target in HOMOGENEOUS_METHODS
    return False


def log_scales(spaces: Sequence[Rescalable], ratios: dict[str, float]) -> dict[str, float]:
    """The log scale u_s of every rescalable space minimising Σ_l (log ρ_l + u_out(l) − u_in(l))² over the
    levels l that write or read one (``ratios``: ρ_l, a level's fused weight norm over its parents'
    mean; a level without one does not count).

    Returns:
        by space name, u_s: its writer's weights and bias are multiplied by exp(u_s), its readers'
        weights by exp(−u_s).
    """
    levels = sorted({name for s in spaces for name in (s.writer, *s.readers) if name in ratios})
    if not spaces or not levels:
        return {}
    row = {name: i for i, name in enumerate(levels)}
    design = torch.zeros(len(levels), len(spaces), dtype=torch.float64)
    for j, space in enumerate(spaces):
        if space.writer in row:
            design[row[space.writer], j] += 1.0
        for reader in space.readers:
            if reader in row:
                design[row[reader], j] -= 1.0
    logs = torch.tensor([math.log(ratios[name]) for name in levels], dtype=torch.float64)
    solution = torch.linalg.lstsq(design, -logs[:, None], driver="gelsd").solution[:, 0]
    return {space.space: float(u) for space, u in zip(spaces, solution)}


def rescale_toward_parents(
    fused: nn.Module, plan: LevelPlan, reports: list[LevelReport], example: Tensor
) -> list[LevelReport]:
    """Rescale ``fused`` in place, as the module docstring says, and return the reports with each
    level's ``weight_norm`` as rescaled. Leaves ``fused`` as it was when its outputs would change on
    ``example`` (an operation the tables take for homogeneous that is not, here)."""
    spaces = rescalable_spaces(plan, fused)
    ratios = {
        r.name: r.weight_norm / r.parent_weight_norm
        for r in reports
        if r.weight_norm and r.parent_weight_norm and math.isfinite(r.weight_norm / r.parent_weight_norm)
    }
    scales = {name: u for name, u in log_scales(spaces, ratios).items() if abs(u) > 1e-12}
    if not scales:
        return reports
    factors = _level_factors(spaces, scales)
    layers = {
        level.name: fused.get_submodule(str(level.layer)) for level in plan.levels if level.name in factors
    }
    touched = [p for layer in layers.values() for p in (layer.weight, layer.bias) if p is not None]
    saved = [p.detach().clone() for p in touched]  # the touched layers only, to undo
    with torch.no_grad():
        before = fused(example)
        for name, (weight_factor, bias_factor) in factors.items():
            layers[name].weight.mul_(weight_factor)
            if layers[name].bias is not None:
                layers[name].bias.mul_(bias_factor)
        if not _unchanged(before, fused(example)):
            for parameter, value in zip(touched, saved):
                parameter.copy_(value)
            return reports
    return [
        replace(r, weight_norm=r.weight_norm * factors[r.name][0])
        if r.name in factors and r.weight_norm is not None
        else r
        for r in reports
    ]


def _level_factors(spaces: Sequence[Rescalable], scales: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Per level, the factors of its weights (exp(u_out − u_in)) and of its bias (exp(u_out))."""
    out: dict[str, float] = {}
    into: dict[str, float] = {}
    for space in spaces:
        u = scales.get(space.space, 0.0)
        out[space.writer] = out.get(space.writer, 0.0) + u
        for reader in space.readers:
            into[reader] = into.get(reader, 0.0) + u
    return {
        name: (math.exp(out.get(name, 0.0) - into.get(name, 0.0)), math.exp(out.get(name, 0.0)))
        for name in {*out, *into}
    }


def _unchanged(before: Tensor, after: Tensor) -> bool:
    """Whether ``after`` equals ``before`` up to `TOLERANCE` of its largest magnitude."""
    if not isinstance(before, Tensor) or not isinstance(after, Tensor) or before.shape != after.shape:
        return False
    scale = before.abs().max().clamp_min(torch.finfo(before.dtype).tiny)
    return bool(((after - before).abs().max() / scale) <= TOLERANCE)
