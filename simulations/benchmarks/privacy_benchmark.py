"""How much the fused model reveals of the server's calibration inputs, before and after the prior.

K MLP clients (784 inputs) are trained on Dirichlet shares of MNIST; the server fuses them on N
calibration images, with fits pulled toward the parents' aligned weights (``prior="parents"``, the
default), toward zero (``prior="zero"``, a plain ridge), and by the paper's pseudo-inverse (toward zero,
ridge 0). For each, the table gives the share of the
fused first layer's row energy outside the span of the N calibration images
(`simulations.calibration_privacy.energy_outside_span`; 0: every row is a mix of calibration images, so
any client of the next round can read their span, and with few images rebuild them), against the
clients' own rows, and the fused model's accuracy.

    python -m simulations.benchmarks.privacy_benchmark --calibration-sizes 10,50,200
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fedfuse import FusionConfig, fuse
from simulations.calibration_privacy import energy_outside_span
from simulations.clients import train_clients
from simulations.datasets import load_dataset
from simulations.partitioning import dirichlet, split_server_sets
from simulations.training import evaluate

#: The fits compared: the default, ridge toward zero, and the paper's pseudo-inverse.
FITS = {
    "toward parents": FusionConfig(),
    "toward zero": FusionConfig(prior="zero"),
    "pseudo-inverse": FusionConfig(prior="zero", ridge=0.0),
}
DEFAULT_MNIST = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.benchmarks.privacy_benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_MNIST, help="folder of the MNIST IDX files")
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--calibration-sizes", default="10,50,200", help="comma-separated N")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(n) for n in args.calibration_sizes.split(",")]
    except ValueError:
        parser.error(f"--calibration-sizes must be comma-separated ints, got {args.calibration_sizes!r}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    data = load_dataset("mnist", args.data_dir)
    labels = data.y.numpy()
    pool, calibration, evaluation = split_server_sets(labels, max(args.sizes), 2000, args.seed)
    parts = [pool[p] for p in dirichlet(labels[pool], args.clients, args.alpha, args.seed)]
    clients = train_clients(data, parts, model="mlp", init="independent", epochs=args.epochs, seed=args.seed)
    test = data.subset(evaluation)
    rows = []
    for size in args.sizes:
        cal = data.subset(calibration[:size])
        inputs = cal.x.flatten(1)
        client_energy = statistics.mean(energy_outside_span(m[1].weight, inputs) for m in clients.models)
        for name, config in FITS.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # N below the fan-in: underdetermined on purpose
                fused = fuse(clients.models, (cal.x, cal.y), replace(config, seed=args.seed)).model
            rows.append(
                {
                    "calibration": size,
                    "fit": name,
                    "fused_energy_outside_span": energy_outside_span(fused[1].weight, inputs),
                    "client_energy_outside_span": client_energy,
                    "accuracy": evaluate(fused, test.x, test.y)["accuracy"],
                }
            )
    print(
        f"MNIST MLP 784-128-64-10, {args.clients} clients from independent inits, Dirichlet({args.alpha}), "
        f"{args.epochs} local epochs, seed {args.seed}: share of first-layer row energy outside the span "
        "of the N calibration images"
    )
    print(f"{'N':>5} {'fit':<16} {'fused':>10} {'clients':>10} {'accuracy':>9}")
    for row in rows:
        print(
            f"{row['calibration']:>5} {row['fit']:<16} {row['fused_energy_outside_span']:>10.3g} "
            f"{row['client_energy_outside_span']:>10.3g} {row['accuracy']:>9.4f}"
        )
    result = {
        "setting": {k: v for k, v in vars(args).items() if k != "output"} | {"data_dir": str(args.data_dir)},
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "rows": rows,
    }
    if args.output:
        args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
