"""One-shot fusion of K client models trained on non-IID digits: FedFuse against averaging and the ensemble.

A quick demonstration of the fusion engine, without Flower: the data are split into a class-balanced
calibration set (the server's), an evaluation set and a client pool; the pool is shared out over K
clients with Dirichlet(alpha) label skew; each client trains its own model; the server then merges
the K models once, by example-weighted averaging (one-shot FedAvg) and by FedFuse, and both are
compared with each client alone and with the logit ensemble of all K (an upper reference that
costs K models at inference).

Run ``python -m simulations.fuse_digits --help`` for the options. Seeds: the split and the
partition use ``--seed``; client k trains with seed 1000·seed + k and, with ``--init independent``,
starts from weights seeded the same way (``--init shared``: all start from seed 1000·seed).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfuse import FusionConfig, fuse
from fedfuse.fusion.config import GROUPINGS, IMPORTANCES
from fedfuse.models import build_model
from simulations.baselines import average_state_dicts, ensemble_logits
from simulations.clients import train_clients
from simulations.datasets import load_digits
from simulations.partitioning import dirichlet, label_histogram, split_server_sets
from simulations.training import classification_scores, evaluate

RESULTS_FILE = "fuse_digits.json"
PARENT_WEIGHTS = ("labels", "size", "none")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.fuse_digits",
        description="One-shot fusion of K client models trained on Dirichlet-skewed digits.",
    )
    parser.add_argument("--clients", type=int, default=4, help="number of clients K (default 4)")
    parser.add_argument(
        "--alpha", type=float, default=0.5, help="Dirichlet label-skew concentration (default 0.5)"
    )
    parser.add_argument(
        "--model", choices=("mlp", "cnn", "cnn-bn"), default="mlp", help="zoo model (default mlp)"
    )
    parser.add_argument(
        "--epochs", type=int, default=30, help="local training epochs per client (default 30)"
    )
    parser.add_argument(
        "--init",
        choices=("independent", "shared"),
        default="independent",
        help="independent: each client starts from its own random weights; shared: all from the same ones",
    )
    parser.add_argument(
        "--importance", choices=IMPORTANCES, default="uniform", help="neuron importance score"
    )
    parser.add_argument(
        "--grouping", choices=GROUPINGS, default="kmeans", help="neuron grouping (hungarian: K=2)"
    )
    parser.add_argument(
        "--parent-weights",
        choices=PARENT_WEIGHTS,
        default="labels",
        help="what FedFuse weights parents by: per-class label counts (default), example counts, or nothing",
    )
    parser.add_argument(
        "--calibration-size", type=int, default=200, help="server calibration examples (default 200)"
    )
    parser.add_argument(
        "--evaluation-size", type=int, default=500, help="held-out evaluation examples (default 500)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the split, partition, inits and training")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: these tiny models run fastest on one, and the results "
        "then do not depend on the machine's core count)",
    )
    parser.add_argument("--output-dir", type=Path, default=None, help=f"write {RESULTS_FILE} here")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the demonstration; print the setting, label histograms and results; return them as a dict.

    The dict holds ``setting`` (the options), ``label_histogram`` ([K][10] label counts),
    ``results`` (one ``{"method", "accuracy", "macro_f1", "seconds"}`` per row: ``seconds`` is the
    time to build that model, i.e. training for a client, merging for averaging and FedFuse, 0 for
    the ensemble) and ``fusion_report`` (FedFuse's per-level report). With ``--output-dir`` the same
    dict is written there as JSON.
    """
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    data = load_digits()
    labels = data.y.numpy()
    pool, calibration_idx, evaluation_idx = split_server_sets(
        labels, args.calibration_size, args.evaluation_size, args.seed
    )
    clients = [pool[part] for part in dirichlet(labels[pool], args.clients, args.alpha, args.seed)]
    histogram = label_histogram(labels, clients, data.num_classes)
    calibration, evaluation = data.subset(calibration_idx), data.subset(evaluation_idx)
    print(
        f"{data.name}: K={args.clients} clients, Dirichlet(alpha={args.alpha}) label skew, {args.init} init, "
        f"{args.model}, {args.epochs} epochs, calibration {len(calibration)} (class-balanced), "
        f"evaluation {len(evaluation)}, seed {args.seed}"
    )
    print(_histogram_table(histogram))

    trained = train_clients(
        data,
        clients,
        model=args.model,
        init=args.init,
        epochs=args.epochs,
        seed=args.seed,
        progress=not args.no_progress,
    )
    models = trained.models
    results: list[dict[str, Any]] = [
        _row(f"client {k}", evaluate(model, evaluation.x, evaluation.y), seconds)
        for k, (model, seconds) in enumerate(zip(models, trained.seconds))
    ]

    started = time.perf_counter()
    averaged = build_model(
        args.model, in_channels=data.in_channels, image_size=data.image_size, num_classes=data.num_classes
    )
    averaged.load_state_dict(
        average_state_dicts([m.state_dict() for m in models], histogram.sum(axis=1).tolist())
    )
    results.append(
        _row("averaging", evaluate(averaged, evaluation.x, evaluation.y), time.perf_counter() - started)
    )

    weights = {"labels": histogram, "size": histogram.sum(axis=1), "none": None}[args.parent_weights]
    config = FusionConfig(
        importance=args.importance, grouping=args.grouping, seed=args.seed, progress=not args.no_progress
    )
    fused = fuse(models, (calibration.x, calibration.y), config=config, weights=weights)
    results.append(_row("fedfuse", evaluate(fused.model, evaluation.x, evaluation.y), fused.report.seconds))

    ensemble = classification_scores(ensemble_logits(models, evaluation.x), evaluation.y)
    results.append(_row("ensemble", ensemble, 0.0))

    print(_results_table(results))
    print(fused.report)
    output = {
        "setting": {
            key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
        },
        "label_histogram": histogram.tolist(),
        "results": results,
        "fusion_report": fused.report.to_dict(),
    }
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        path = args.output_dir / RESULTS_FILE
        path.write_text(json.dumps(output, indent=2))
        print(f"wrote {path}")
    return output


def _row(method: str, scores: dict[str, float], seconds: float) -> dict[str, Any]:
    return {
        "method": method,
        "accuracy": scores["accuracy"],
        "macro_f1": scores["macro_f1"],
        "seconds": seconds,
    }


def _histogram_table(histogram: np.ndarray) -> str:
    """Label counts per client, one row each, with the client's size."""
    width = max(len(str(int(histogram.max()))), 3)
    header = "labels    " + " ".join(f"{c:>{width}}" for c in range(histogram.shape[1])) + "      n"
    rows = [
        f"client {k:<2} " + " ".join(f"{int(n):>{width}}" for n in counts) + f" {int(counts.sum()):>6}"
        for k, counts in enumerate(histogram)
    ]
    return "\n".join([header, *rows])


def _results_table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'method':<10} {'accuracy':>8} {'macro-F1':>8} {'seconds':>8}"]
    lines += [
        f"{r['method']:<10} {r['accuracy']:>8.4f} {r['macro_f1']:>8.4f} {r['seconds']:>8.2f}" for r in results
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
