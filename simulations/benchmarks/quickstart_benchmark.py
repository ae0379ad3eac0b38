"""The quickstart-style app (simulations/quickstart_app) run for real: FedFuse against FedAvg, the one line
that differs, on the same clients.

Each setting (partitioning, seed) is run twice through ``flwr run`` on a local simulation SuperLink with
5 SuperNodes, once per strategy; the clients train the same way from the same start in both, so round 1
differs only by the aggregation. MNIST is the official test split read from ``--data-dir`` (padded to
3x32x32), cut by the app with the seed into a client pool, a calibration set (200) and an evaluation set
(2,000). Over several rounds the table also shows what the clients' training does from the fused model:
their mean training loss per round (a diverging round shows as a huge loss or NaN) and the largest ratio
of a fused layer's weight norm to the clients' (``fusion-max-norm-ratio``, of the fused models the round
kept), and how many rounds kept the
previous model because the new one was worse on the calibration set (FedFuse's guard; FedAvg given the
same guard as ``fedavg-guarded``).

    python -m simulations.benchmarks.quickstart_benchmark                       # one-shot, iid and dirichlet
    python -m simulations.benchmarks.quickstart_benchmark --rounds 5 --learning-rate 0.1 --local-epochs 1

Prints a table and writes the JSON with every run's metrics to --output.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulations.flower_processes import QUICKSTART_DIR, flwr_run, simulation_superlink

DEFAULT_MNIST = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist"
REPO = QUICKSTART_DIR.parents[1]
#: The app's strategies (its ``strategy`` config key).
STRATEGIES = ("fedavg", "fedavg-guarded", "fedfuse", "fedfuse-unguarded")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.benchmarks.quickstart_benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_MNIST, help="folder of the MNIST IDX files")
    parser.add_argument("--partitionings", default="iid,dirichlet", help="comma-separated: iid, dirichlet")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--local-epochs", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=0.02, help="clients' SGD (momentum 0.9)")
    parser.add_argument(
        "--strategies",
        default="fedavg,fedfuse",
        help=f"comma-separated, of {', '.join(STRATEGIES)} (the guarded and unguarded ones differ by "
        "FedFuse's guard, fedfuse.strategy.guard)",
    )
    parser.add_argument("--output", type=Path, default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    if (
        not (args.data_dir / "t10k-images-idx3-ubyte.gz").exists()
        and not (args.data_dir / "t10k-images-idx3-ubyte").exists()
    ):
        parser.error(f"--data-dir {args.data_dir} holds no MNIST IDX files")
    for name in args.strategies.split(","):
        if name not in STRATEGIES:
            parser.error(f"--strategies takes {', '.join(STRATEGIES)}, got {name!r}")
    for name in args.partitionings.split(","):
        if name not in ("iid", "dirichlet"):
            parser.error(f"--partitionings takes iid and dirichlet, got {name!r}")
    return args


def run(env: dict[str, str], home: Path, name: str, overrides: dict[str, object]) -> dict[str, Any]:
    """One ``flwr run`` of the app; its metrics.json."""
    output = home / "outputs" / name
    config = " ".join(
        f"{key}={json.dumps(value) if isinstance(value, str) else value}"
        for key, value in {**overrides, "output-dir": str(output)}.items()
    )
    config = config.replace('"', "'")
    started = time.perf_counter()
    completed = flwr_run(
        [str(QUICKSTART_DIR.relative_to(REPO)), "--federation-config", "num-supernodes=5", "-c", config],
        env=env,
        cwd=REPO,
        timeout=3000,
    )
    if completed.returncode != 0 or not (output / "metrics.json").exists():
        raise RuntimeError(f"flwr run {name} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    metrics = json.loads((output / "metrics.json").read_text())
    metrics["wall_seconds"] = time.perf_counter() - started
    return metrics


def summarise(runs: list[dict[str, Any]], rounds: int) -> list[str]:
    lines = [
        f"{'partitioning':<12} {'strategy':<17} "
        + " ".join(f"{f'round {r}':>13}" for r in range(1, rounds + 1))
        + f" {'max train loss':>15} {'max norm ratio':>15} {'rounds kept':>12}"
    ]
    keys = sorted({(r["partitioning"], r["strategy"]) for r in runs})
    for partitioning, strategy in keys:
        group = [r for r in runs if (r["partitioning"], r["strategy"]) == (partitioning, strategy)]
        cells = []
        for round_ in range(1, rounds + 1):
            scores = [r["server_evaluation"][str(round_)]["accuracy"] for r in group]
            spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
            cells.append(f"{statistics.mean(scores):.3f} ± {spread:.3f}")
        losses = [m.get("train_loss", float("nan")) for r in group for m in r["train_metrics"].values()]
        ratios = [  # of the models sent to the clients: not of those the guard kept back
            m["fusion-max-norm-ratio"]
            for r in group
            for m in r["train_metrics"].values()
            if "fusion-max-norm-ratio" in m and not m.get("fusion-kept-previous")
        ]
        kept = sum(int(m.get("fusion-kept-previous", 0)) for r in group for m in r["train_metrics"].values())
        lines.append(
            f"{partitioning:<12} {strategy:<17} "
            + " ".join(f"{c:>13}" for c in cells)
            + f" {max(losses):>15.3g} {(max(ratios) if ratios else float('nan')):>15.2f} {kept:>12}"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="quickstart-benchmark-") as folder:
        home = Path(folder)
        with simulation_superlink(home) as env:
            for partitioning in args.partitionings.split(","):
                for seed in range(args.seeds):
                    for strategy in args.strategies.split(","):
                        overrides = {
                            "strategy": strategy,
                            "dataset": "mnist",
                            "data-dir": str(args.data_dir.resolve()),
                            "evaluation-size": 2000,
                            "partitioning": partitioning,
                            "dirichlet-alpha": args.alpha,
                            "seed": seed,
                            "num-server-rounds": args.rounds,
                            "local-epochs": args.local_epochs,
                            "learning-rate": args.learning_rate,
                        }
                        metrics = run(env, home, f"{partitioning}-{seed}-{strategy}", overrides)
                        runs.append(
                            {"partitioning": partitioning, "seed": seed, "strategy": strategy, **metrics}
                        )
                        final, seconds = metrics["final"]["accuracy"], metrics["wall_seconds"]
                        print(
                            f"{partitioning} seed {seed} {strategy}: {final:.4f} ({seconds:.0f} s)",
                            flush=True,
                        )
    lines = summarise(runs, args.rounds)
    header = (
        "quickstart app, MNIST padded to 3x32x32 (official test split: 200 calibration, 2,000 evaluation, "
        f"the rest over 5 clients), {args.partitionings} (Dirichlet alpha {args.alpha}), {args.rounds} "
        f"round(s) of {args.local_epochs} local epoch(s), SGD lr {args.learning_rate} momentum 0.9, seeds "
        f"0-{args.seeds - 1}, default FusionConfig(); server-side accuracy per round, mean ± std over seeds"
    )
    print(header)
    print("\n".join(lines))
    result = {
        "setting": vars(args) | {"data_dir": str(args.data_dir), "output": str(args.output)},
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "table": lines,
        "runs": runs,
    }
    if args.output:
        args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
