"""Fusion benchmark: what FedFuse's engine buys over averaging, and what it costs, on real data.

For each zoo model and each K, K parents are trained from independent random inits on Dirichlet(alpha)
label-skewed shares of a client pool; the server holds a class-balanced calibration set no client has
and an evaluation set nobody trains on. Rows: the mean and best parent, example-weighted averaging
(one-shot FedAvg), FedFuse with each importance method (k-means; Hungarian too at K = 2; default
settings: nothing disclosed by the clients), and the clients' ensembles with no more information than
FedFuse (`simulations.baselines.ENSEMBLES`: K models at inference). Fusion time is reported in
seconds and, measured in the same run, as a ratio to one client's local training time.

    python -m simulations.benchmarks.fusion_benchmark                 # MNIST from ../shared/data/mnist
    python -m simulations.benchmarks.fusion_benchmark --dataset digits --parents 2,4 --models mlp

Prints a table and the JSON (also written with --output). The MNIST data is its official test split,
split here with the seed into client pool, calibration and evaluation sets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfuse import FusionConfig, describe_levels, fuse
from fedfuse.fusion.config import IMPORTANCES, VARIANTS
from fedfuse.models import build_model
from simulations.baselines import average_state_dicts, ensemble_predictions
from simulations.benchmarks.memory import peak_memory
from simulations.clients import train_clients
from simulations.datasets import Dataset, load_dataset
from simulations.partitioning import dirichlet, label_histogram, split_server_sets
from simulations.training import classification_scores, evaluate

#: Sizes that train in seconds on 2 CPU cores (a full-width VGG11 takes 15 s an epoch on 2,000 images).
MODEL_OPTIONS = {"vgg11": {"width_multiplier": 0.25}, "vgg11-bn": {"width_multiplier": 0.25}}
DEFAULT_MNIST = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.benchmarks.fusion_benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", default="mnist", help="mnist (IDX files in --data-dir) or digits")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_MNIST, help="folder of the IDX files")
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated zoo models")
    parser.add_argument("--parents", default="2,4,8", help="comma-separated K values")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated fusion variants")
    parser.add_argument(
        "--importance", default="uniform", help=f"comma-separated, of {', '.join(IMPORTANCES)}"
    )
    parser.add_argument(
        "--widths",
        default="1",
        help="comma-separated fused width multipliers (chains only; 1 = the parents')",
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew concentration")
    parser.add_argument("--calibration-size", type=int, default=400)
    parser.add_argument("--evaluation-size", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3, help="local epochs per parent")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is fastest for small models)"
    )
    parser.add_argument("--output", type=Path, default=None, help="write the JSON here too")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    return parser.parse_args(argv)


def benchmark_setting(
    data: Dataset,
    pool: np.ndarray,
    calibration: Dataset,
    evaluation: Dataset,
    model: str,
    parents: int,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Train K parents, merge them every way, and score each result on the evaluation set."""
    labels = data.y.numpy()
    partitions = [pool[part] for part in dirichlet(labels[pool], parents, args.alpha, args.seed)]
    counts = label_histogram(labels, partitions, data.num_classes)
    clients = train_clients(
        data,
        partitions,
        model=model,
        init="independent",
        epochs=args.epochs,
        seed=args.seed,
        progress=args.progress,
        model_options=MODEL_OPTIONS.get(model),
    )
    training_seconds = statistics.mean(clients.seconds)
    setting = {"model": model, "parents": parents}

    def row(
        method: str,
        scores: dict[str, float],
        seconds: float = 0.0,
        fit_r2: float | None = None,
        peak_mb: float | None = None,
    ) -> dict:
        return {
            **setting,
            "method": method,
            **scores,
            "fusion_seconds": seconds,
            "seconds_per_training": seconds / training_seconds,
            "fit_r2": fit_r2,
            "fusion_peak_mb": peak_mb,
        }

    parent_scores = [evaluate(m, evaluation.x, evaluation.y) for m in clients.models]
    rows = [
        row("mean parent", {k: statistics.mean(s[k] for s in parent_scores) for k in parent_scores[0]}),
        row("best parent", max(parent_scores, key=lambda s: s["accuracy"])),
    ]
    averaged = build_model(
        model,
        in_channels=data.in_channels,
        image_size=data.image_size,
        num_classes=data.num_classes,
        **MODEL_OPTIONS.get(model, {}),
    )
    averaged.load_state_dict(
        average_state_dicts([m.state_dict() for m in clients.models], counts.sum(1).tolist())
    )
    rows.append(row("averaging", evaluate(averaged, evaluation.x, evaluation.y)))
    plan = describe_levels(clients.models[0], calibration.x[:8])
    closed_form = all(level.closed_form for level in plan.levels)
    configs = [
        (
            f"fedfuse {variant} {imp}" + (f" width x{width:g}" if width != 1 else ""),
            FusionConfig(variant=variant, importance=imp, seed=args.seed, width_multiplier=width),
        )
        for variant in args.variants
        if variant == "gradient" or closed_form  # the linear variant fits Linear/Conv levels only
        for imp in args.importance
        for width in (args.widths if plan.resizable else [1.0])
        if width <= parents  # more groups than parent neurons cannot be made
    ]
    if parents == 2 and closed_form and "linear" in args.variants:
        configs.append(("fedfuse linear hungarian", FusionConfig(grouping="hungarian", seed=args.seed)))
    for method, config in configs:
        with peak_memory() as memory:
            result = fuse(clients.models, (calibration.x, calibration.y), config)  # nothing disclosed
        scores = evaluate(result.model, evaluation.x, evaluation.y)
        rows.append(row(method, scores, result.report.seconds, result.report.mean_fit_r2, memory["peak_mb"]))
    ensembles = ensemble_predictions(clients.models, (calibration.x, calibration.y), evaluation.x)
    rows += [row(name, classification_scores(logits, evaluation.y)) for name, logits in ensembles.items()]
    return rows


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def table(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'model':<8} {'K':>2}  {'method':<40} {'acc':>6} {'F1':>6} "
        + f"{'fit R2':>7} {'fuse s':>7} {'/train':>7} {'peak MB':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        r2 = "" if r["fit_r2"] is None else f"{r['fit_r2']:.3f}"
        timing = (
            f"{r['fusion_seconds']:>7.2f} {r['seconds_per_training']:>7.2f}" if r["fusion_seconds"] else ""
        )
        memory = "" if r["fusion_peak_mb"] is None else f"{r['fusion_peak_mb']:>8.0f}"
        lines.append(
            f"{r['model']:<8} {r['parents']:>2}  {r['method']:<40} {r['accuracy']:>6.3f} "
            f"{r['macro_f1']:>6.3f} {r2:>7} {timing} {memory}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.importance, args.variants = args.importance.split(","), args.variants.split(",")
    args.widths = [float(width) for width in args.widths.split(",")]
    for given, known in ((args.importance, IMPORTANCES), (args.variants, VARIANTS)):
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise SystemExit(f"unknown choice(s) {unknown}; choose from {list(known)}")
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, args.data_dir if args.dataset != "digits" else None)
    pool, calibration_idx, evaluation_idx = split_server_sets(
        data.y.numpy(), args.calibration_size, args.evaluation_size, args.seed
    )
    calibration, evaluation = data.subset(calibration_idx), data.subset(evaluation_idx)
    summary = (
        f"{data.name} ({len(data)} images): pool {len(pool)}, calibration {len(calibration)} "
        f"(class-balanced), evaluation {len(evaluation)}; Dirichlet alpha {args.alpha}; independent "
        f"inits; {args.epochs} local epochs; seed {args.seed}"
    )
    print(summary, flush=True)
    rows = []
    for model in args.models.split(","):
        for parents in (int(k) for k in args.parents.split(",")):
            rows += benchmark_setting(data, pool, calibration, evaluation, model, parents, args)
            print(table([r for r in rows if r["model"] == model and r["parents"] == parents]), flush=True)
    output = {
        "setting": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "summary": summary,
        "machine": machine(),
        "rows": rows,
    }
    print("\n" + summary + "\n" + table(rows))
    print(json.dumps(output, indent=1))
    if args.output:
        args.output.write_text(json.dumps(output, indent=1))
    return output


if __name__ == "__main__":
    main()
