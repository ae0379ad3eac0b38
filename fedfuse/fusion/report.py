"""What a fusion did, level by level: plain objects that print as a table and convert to a dict."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class LevelReport:
    """One fused level.

    Attributes:
        name: the level's layer in the fused model's state_dict namespace (``"features.3"``).
        kind: ``"linear"``, ``"conv1d"``, ``"conv2d"``, ``"depthwise1d"``, ``"depthwise2d"``,
            ``"embedding"`` or ``"block"``.
        neurons: fused neurons (output features or channels) of the level.
        fan_in: inputs of one neuron (``in_features``, or ``in_channels·kernel`` for a convolution),
            plus one for the bias when the level has one; for a block, its input's values per sample.
        rows: calibration rows the level was fitted on: samples, times output positions for a
            convolution; 0 for an embedding table, whose fit reads none (`fedfuse.fusion.lookup`).
        grouping: ``"kmeans"``, ``"hungarian"``, ``"index"`` (fixed spaces, the classes: matched by
            index) or ``"stream"`` (a level of a residual stream whose grouping an earlier level decided).
        grouping_cost: the importance-weighted share of the parents' neuron variance that merging
            loses, Σ_j s_j‖z_j − T_a(j)‖² / Σ_j s_j‖z_j − z̄_j‖²; 0 when every group's members agree.
        fit_r2: R² of the fused level's outputs against its group targets on the calibration rows
            (pooled over neurons); 1 is a perfect fit.
        seconds: wall-clock seconds per phase: ``statistics`` (forward passes and accumulation),
            ``importance``, ``grouping``, ``solve``.
        space: the space (or residual stream) whose grouping the level's neurons follow.
        rank: linear variant: the numerical rank of the level's inputs on the calibration rows (bias
            column included).
        live_inputs: linear variant: the inputs (bias included) not zero on every row; a rank below
            it means the calibration set does not span them, and the fit is underdetermined.
        epochs: gradient variant: epochs the level trained for (early stopping may end it sooner).
        output_target, target_accuracy: the output layer with ``output_target="auto"``: the target it was
            fitted to, and each target's held-out accuracy on the calibration set
            (`fedfuse.fusion.head_choice`); None otherwise.
        weight_norm, parent_weight_norm: the Frobenius norm of the fused level's weights (a layer's
            map with its BatchNorm folded in, bias left out; every parameter of a block), and the
            parents' mean: fused weights far larger than the parents' make the next round diverge.
    """

    name: str
    kind: str
    neurons: int
    fan_in: int
    rows: int
    grouping: str
    grouping_cost: float
    fit_r2: float
    seconds: dict[str, float] = field(default_factory=dict)
    space: str = ""
    rank: int | None = None
    live_inputs: int | None = None
    epochs: int | None = None
    weight_norm: float | None = None
    parent_weight_norm: float | None = None
    output_target: str | None = None
    target_accuracy: dict[str, float] | None = None

    @property
    def ill_posed(self) -> bool:
        """The calibration inputs did not span the level's inputs: the ridge kept the solve well-posed."""
        return self.rank is not None and self.live_inputs is not None and self.rank < self.live_inputs

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


@dataclass(frozen=True)
class FusionReport:
    """The whole fusion: its setting (``config["ridge"]`` is the ridge the fits used), one `LevelReport`
    per level, and totals. With ``sharpness_limit="parents"``: ``sharpness``, the fused model's largest
    Hessian eigenvalue on the calibration set, and ``parent_sharpness``, its limit (the parents'
    median; `fedfuse.fusion.sharpness`)."""

    parents: int
    calibration_samples: int
    config: dict[str, Any]
    levels: tuple[LevelReport, ...]
    seconds: float
    sharpness: float | None = None
    parent_sharpness: float | None = None

    @property
    def mean_fit_r2(self) -> float:
        """Mean R² over levels (nan with no levels, as for K = 1)."""
        if not self.levels:
            return float("nan")
        return sum(level.fit_r2 for level in self.levels) / len(self.levels)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values, levels included."""
        out = asdict(self)
        out["levels"] = [
            dict(asdict(level), total_seconds=level.total_seconds, ill_posed=level.ill_posed)
            for level in self.levels
        ]
        out["mean_fit_r2"] = self.mean_fit_r2
        return out

    def table(self) -> str:
        """A fixed-width table, one row per level, then the totals."""
        header = ("level", "kind", "neurons", "fan_in", "rows", "grouping", "cost", "fit R2", "seconds")
        rows = [
            (
                level.name,
                level.kind,
                str(level.neurons),
                str(level.fan_in) + ("*" if level.ill_posed else ""),
                str(level.rows),
                level.grouping,
                f"{level.grouping_cost:.4f}",
                f"{level.fit_r2:.4f}",
                f"{level.total_seconds:.2f}",
            )
            for level in self.levels
        ]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        line = "  ".join
        lines = [
            f"fused {self.parents} parents on {self.calibration_samples} calibration samples "
            f"({self.config.get('variant')}, {self.config.get('grouping')}, "
            f"importance={self.config.get('importance')}, seed={self.config.get('seed')})",
            line(h.ljust(w) for h, w in zip(header, widths)),
        ]
        lines += [line(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.append(f"total {self.seconds:.2f} s, mean fit R2 {self.mean_fit_r2:.4f}")
        if any(level.ill_posed for level in self.levels):
            lines.append(
                "* the calibration inputs span fewer dimensions than fan-in: the ridge kept the solve "
                "well-posed"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
