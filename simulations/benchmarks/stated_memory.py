"""The peak memory docs/fusion.md states for a fusion ("Peak memory"), computed term by term for one
fusion, so that the scaling benchmark can set what it measures against what is promised."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fedfuse import FusionConfig
from fedfuse.fusion.clustering import COST_CHUNK
from fedfuse.fusion.context import CHUNK_VALUES
from fedfuse.fusion.kmeans import GRAM_SEEDING_BYTES
from fedfuse.fusion.reading import CHECKPOINT_VALUES
from fedfuse.fusion.report import FusionReport

MIB = 1 << 20


def stated_peak_mb(
    parents: Sequence[nn.Module], inputs: Tensor, report: FusionReport, config: FusionConfig
) -> dict[str, float]:
    """Each term of docs/fusion.md's peak-memory formula for this fusion, in MiB, and their ``"total"``.

    The sizes the formula names are read off the parents (their parameters and buffers, the largest
    value a module outputs per sample, an upper bound on a cut and on a stream's sums) and off the fusion's
    report (per level: n, d, g and the rows); per-level terms are taken at the level where they are
    largest, as one level is fitted at a time.

    Args:
        parents: the K parents fused.
        inputs: the calibration inputs ``[N, ...]`` (a tensor: the caller's memory, not counted).
        report: the fusion's report.
        config: the fusion's config (``grouping_dims``).
    """
    k, samples = len(parents), len(inputs)
    model = parents[0]
    parent_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    largest = _largest_output_per_sample(model, inputs[:2])
    dims = config.grouping_dims
    per_level = []
    for level in report.levels:
        points = k * level.neurons
        rows = level.rows or samples
        span = min(dims, rows) if points > dims or rows <= dims else points  # the points' dimensions
        embedding = 2 * 8 * points * span  # kept, and put together once
        table = min(4 * points * points, GRAM_SEEDING_BYTES)
        kmeans = 4 * 4 * points * span + 4 * points * level.neurons
        costs = 3 * 8 * min(points, COST_CHUNK) * span + 8 * points * level.neurons
        width = (level.fan_in or 0) + level.neurons
        chunk_rows = min(rows, max(1, CHUNK_VALUES // max(1, k * level.neurons)))
        statistics = 8 * width * (min(rows, width) + chunk_rows)
        maps = 8 * points * ((level.fan_in or 0) + 1)  # the parents' folded weights, for the prior
        per_level.append(embedding + table + kmeans + costs + statistics + maps)
    terms = {
        "models": (k + 1) * parent_bytes,
        "checkpoints": min(4 * (k + 1) * samples * 2 * largest, 2 * 4 * CHECKPOINT_VALUES),
        "stream targets": min(4 * k * samples * largest * len(report.levels), 4 * CHECKPOINT_VALUES),
        "level work": max(per_level, default=0),
        "chunk": 4 * 8 * CHUNK_VALUES,
    }
    stated = {name: value / MIB for name, value in terms.items()}
    stated["total"] = sum(stated.values())
    return stated


def _largest_output_per_sample(model: nn.Module, example: Tensor) -> int:
    """The most values any module of ``model`` outputs per sample (on ``example``): a bound on what one
    sample holds at any point of the forward, a cut included."""
    largest = [int(example[0].numel())]

    def watch(_: nn.Module, __: object, output: object) -> None:
        for value in output if isinstance(output, tuple) else (output,):
            if isinstance(value, Tensor) and value.dim() > 0 and len(value) == len(example):
                largest.append(value[0].numel())

    handles = [module.register_forward_hook(watch) for module in model.modules()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return max(largest)
