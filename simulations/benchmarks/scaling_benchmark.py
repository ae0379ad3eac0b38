"""Scaling benchmark: what a fusion costs as the number of clients K, the calibration set and the width grow.

For each model and K, K parents are trained briefly from independent seeded inits on disjoint shares of
the data (what they learn barely changes the cost); the linear variant with uniform importance fuses them
on the calibration set, once per k-means start (`FusionConfig.kmeans_init`): once watched for memory,
then ``--repeats`` times timed (the machines this runs on are shared and noisy). Reported per row: the
least and the median wall seconds, peak resident memory above the level at its start
(`simulations.benchmarks.memory`) beside the peak docs/fusion.md states for that fusion
(`simulations.benchmarks.stated_memory`; a row whose measured peak exceeds it is flagged), the fused
model's accuracy on held-out data, and the limit ratio,
fusion seconds over one forward and backward pass of all K parents on the calibration set, measured
after each fusion in the same run (least over least, and median over median). The growth exponent is
the slope of log least seconds against log K, fitted from K = 8 up.

    python -m simulations.benchmarks.scaling_benchmark                       # MNIST, K = 2 ... 64
    python -m simulations.benchmarks.scaling_benchmark --dataset digits --parents 2,4 --models mlp

Prints a table and the JSON (also written with --output).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedfuse import FusionConfig, fuse
from fedfuse.fusion.config import KMEANS_INITS
from fedfuse.models import build_model
from simulations.benchmarks.fusion_benchmark import DEFAULT_MNIST, machine
from simulations.benchmarks.memory import peak_memory
from simulations.benchmarks.stated_memory import stated_peak_mb
from simulations.datasets import Dataset, load_dataset
from simulations.partitioning import split_server_sets
from simulations.training import evaluate, train

#: Zoo models as the issue measured them: an MLP 784-256-10 and the small CNN.
MODEL_OPTIONS: dict[str, dict[str, Any]] = {"mlp": {"hidden": (256,)}, "cnn": {}}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.benchmarks.scaling_benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", default="mnist", help="mnist (IDX files in --data-dir) or digits")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_MNIST, help="folder of the IDX files")
    parser.add_argument("--models", default="mlp,cnn", help=f"comma-separated, of {', '.join(MODEL_OPTIONS)}")
    parser.add_argument("--parents", default="2,4,8,16,32,64", help="comma-separated K values")
    parser.add_argument("--inits", default=",".join(KMEANS_INITS), help="comma-separated k-means starts")
    parser.add_argument(
        "--calibration-sizes", default="400", help="comma-separated calibration sizes (at the largest K)"
    )
    parser.add_argument("--hidden", default="256", help="comma-separated MLP widths (at the largest K)")
    parser.add_argument("--samples-per-parent", type=int, default=200, help="training samples per parent")
    parser.add_argument("--evaluation-size", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--repeats", type=int, default=3, help="fusions per row: seconds are their least and median"
    )
    parser.add_argument("--output", type=Path, default=None, help="write the JSON here too")
    args = parser.parse_args(argv)
    args.models = args.models.split(",")
    args.parents = [int(k) for k in args.parents.split(",")]
    args.inits = args.inits.split(",")
    args.calibration_sizes = [int(n) for n in args.calibration_sizes.split(",")]
    args.hidden = [int(n) for n in args.hidden.split(",")]
    for flag, given, known in (
        ("--models", args.models, MODEL_OPTIONS),
        ("--inits", args.inits, KMEANS_INITS),
    ):
        unknown = sorted(set(given) - set(known))
        if unknown:
            parser.error(f"{flag}: unknown {unknown}; choose from {', '.join(known)}")
    if min(args.parents) < 2:
        parser.error("--parents: every K must be >= 2")
    if args.repeats < 1:
        parser.error("--repeats: at least 1")
    return args


def train_parents(
    data: Dataset, pool: np.ndarray, model: str, options: dict[str, Any], count: int, args: argparse.Namespace
) -> list[nn.Module]:
    """``count`` parents, parent k trained one epoch on its own slice of the pool, seed k."""
    parents = []
    for k in range(count):
        parent = build_model(
            model,
            in_channels=data.x.shape[1],
            image_size=data.x.shape[2],
            num_classes=data.num_classes,
            seed=args.seed + k,
            **options,
        )
        share = pool[(k * args.samples_per_parent) % len(pool) :][: args.samples_per_parent]
        train(parent, data.x[share], data.y[share], epochs=1, seed=args.seed + k)
        parents.append(parent.eval())
    return parents


def pass_seconds(parents: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor) -> float:
    """One forward and backward pass of every parent on the calibration set: the limit ratio's unit."""
    started = time.perf_counter()
    for parent in parents:
        nn.functional.cross_entropy(parent(x), y).backward()
        parent.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def measure(
    parents: Sequence[nn.Module],
    calibration: Dataset,
    evaluation: Dataset,
    init: str,
    seed: int,
    repeats: int = 1,
) -> dict[str, Any]:
    """One fusion for its peak memory and the fused model's accuracy, then ``repeats`` timed fusions (the
    same one: same seed, same model), each followed by the limit ratio's unit: the least and the median
    seconds of each, and the limit ratio as least over least (``limit_ratio``) and median over median.

    The memory probe hands the freed heap back to the system first (`peak_memory`), so the fusion it
    watches pays for touching fresh pages again (0.03-0.05 s of eight MLPs' 0.5 s, measured alternately):
    the timed fusions run without it, as the fusions of a long-running server do."""
    config = FusionConfig(importance="uniform", kmeans_init=init, seed=seed)
    with peak_memory() as memory:
        result = fuse(parents, (calibration.x, calibration.y), config)
    seconds, units = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        fuse(parents, (calibration.x, calibration.y), config)
        seconds.append(time.perf_counter() - started)
        units.append(pass_seconds(parents, calibration.x, calibration.y))
    stated = stated_peak_mb(parents, calibration.x, result.report, config)
    return {
        "seconds": min(seconds),
        "seconds_median": statistics.median(seconds),
        "peak_mb": memory["peak_mb"],
        "stated_mb": stated["total"],
        "stated_terms_mb": stated,
        "accuracy": evaluate(result.model, evaluation.x, evaluation.y)["accuracy"],
        "pass_seconds": min(units),
        "limit_ratio": min(seconds) / min(units),
        "limit_ratio_median": statistics.median(seconds) / statistics.median(units),
        "repeats": repeats,
    }


def growth_exponent(rows: Sequence[dict[str, Any]], least_k: int = 8) -> float | None:
    """The slope of log seconds against log K over the rows with K >= ``least_k`` (None: under 2)."""
    points = [(math.log(r["parents"]), math.log(r["seconds"])) for r in rows if r["parents"] >= least_k]
    if len(points) < 2:
        return None
    x, y = np.array(points).T
    return float(np.polyfit(x, y, 1)[0])


def table(rows: Sequence[dict[str, Any]]) -> str:
    header = (
        f"{'model':<5} {'width':>5} {'cal':>5} {'K':>3} {'init':<10} {'s min':>7} {'s med':>7} "
        f"{'peak MB':>8} {'stated':>7} {'limit':>6} {'(med)':>6} {'acc':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        memory = "" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        lines.append(
            f"{r['model']:<5} {r['width'] or '':>5} {r['calibration_size']:>5} {r['parents']:>3} "
            f"{r['init']:<10} {r['seconds']:>7.2f} {r['seconds_median']:>7.2f} {memory:>8} "
            f"{r['stated_mb']:>7.0f} "
            f"{r['limit_ratio']:>6.1f} {r['limit_ratio_median']:>6.1f} {r['accuracy']:>6.3f}"
            + (
                "  above the stated peak"
                if r["peak_mb"] is not None and r["peak_mb"] > r["stated_mb"]
                else ""
            )
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, args.data_dir if args.dataset != "digits" else None)
    largest = max(args.calibration_sizes)
    pool, calibration_idx, evaluation_idx = split_server_sets(
        data.y.numpy(), largest, args.evaluation_size, args.seed
    )
    evaluation = data.subset(evaluation_idx)
    default_size = 400 if 400 in args.calibration_sizes else args.calibration_sizes[0]
    rows: list[dict[str, Any]] = []

    def run(model: str, width: int | None, size: int, parents: list[nn.Module], k: int, sweep: str) -> None:
        calibration = data.subset(calibration_idx[:size])
        for init in args.inits:
            row = {"model": model, "width": width, "calibration_size": size, "parents": k, "init": init}
            row["sweep"] = sweep
            row |= measure(parents[:k], calibration, evaluation, init, args.seed, args.repeats)
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)

    print(table([]), flush=True)
    for model in args.models:
        widths = args.hidden if model == "mlp" else [None]
        default_width = 256 if 256 in widths else widths[0]
        for width in widths:
            options = MODEL_OPTIONS[model] | ({"hidden": (width,)} if width is not None else {})
            parents = train_parents(data, pool, model, options, max(args.parents), args)
            # One untimed fusion first: no row pays the one-time imports (scikit-learn, SciPy) and warm-up.
            fuse(parents[:2], data.subset(calibration_idx[:default_size]).x, FusionConfig(seed=args.seed))
            if width == default_width:  # the K sweep, at the default width and calibration size
                for k in args.parents:
                    run(model, width, default_size, parents, k, "K")
                for size in args.calibration_sizes:
                    if size != default_size:
                        run(model, width, size, parents, max(args.parents), "calibration size")
            else:
                run(model, width, default_size, parents, max(args.parents), "width")
    exponents = {
        f"{model} {init}": growth_exponent(
            [r for r in rows if r["model"] == model and r["init"] == init and r["sweep"] == "K"]
        )
        for model in args.models
        for init in args.inits
    }
    for name, exponent in exponents.items():
        print(
            f"growth exponent of seconds in K from K = 8 ({name}): "
            + (f"{exponent:.2f}" if exponent else "n/a")
        )
    document = {
        "setting": {
            key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
        },
        "machine": machine(),
        "rows": rows,
        "growth_exponents": exponents,
    }
    print(json.dumps(document, indent=1))
    if args.output:
        args.output.write_text(json.dumps(document, indent=1))
    return document


if __name__ == "__main__":
    main()
