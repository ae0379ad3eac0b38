"""Peer benchmark (issue 12): FedFuse against the one-shot methods a reader knows, on the same client models.

For every model, init, K and Dirichlet alpha, and every seed, the one-shot harness (`simulations.one_shot`)
trains K clients once through Flower's simulation runtime and scores, on the same client models and the
same server calibration set: FedFuse with its default settings (linear variant, uniform importance,
fusion weights measured on the calibration set: nothing disclosed by the clients), Git Re-Basin weight
matching, OT fusion, RegMean, FedDF-style distillation, Flower's FedAvg / FedProx / FedMedian /
FedTrimmedAvg / Krum on the clients' replies, and as references the best client and the best ensemble
(K models at inference). The table gives accuracy on the evaluation set, mean ± standard deviation over
the seeds, and each method's mean seconds to merge.

VGG11 runs at a quarter of its width by default (``--width-multiplier 0.25``: 16 ... 128 channels, 0.6M
weights on MNIST instead of 9.5M), as in the fusion benchmark: the full-width grid does not fit a
CPU-only machine. The width is part of the setting, in the JSON and in every table's title.

    python -m simulations.benchmarks.peer_benchmark      # the full grid: cnn and vgg11, K 2,4,8, ... 3 seeds
    python -m simulations.benchmarks.peer_benchmark --models cnn --clients 2,4 --seeds 1 --epochs 3

Writes ``peers.md`` (the tables), ``peers.json`` (the setting and every summary row; rewritten after every
setting, so a cut-short run keeps what it measured) and ``peers.png`` to ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from fedfuse.models import MODEL_NAMES
from simulations.baselines import PEER_METHODS
from simulations.datasets import DATASET_NAMES
from simulations.one_shot.methods import MethodOptions
from simulations.one_shot.setting import INITS, WIDTH_MODELS, Setting
from simulations.one_shot.summary import SummaryRow, summarize
from simulations.one_shot.sweep import SettingResult, run_sweep

FEDFUSE = "fedfuse linear uniform"  # FusionConfig's defaults, as the harness names them
REFERENCES = ("fedavg one-shot", "best client", "best ensemble")
METHODS = (FEDFUSE, *PEER_METHODS, *REFERENCES)
DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"
#: VGG11's default width here (`fusion_benchmark.MODEL_OPTIONS` uses the same).
VGG_WIDTH = 0.25


def build_parser() -> argparse.ArgumentParser:
    def listed(kind, choices=None):
        def parse(text: str) -> tuple:
            values = tuple(kind(item.strip()) for item in text.split(","))
            bad = [v for v in values if choices is not None and v not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
            return values

        return parse

    parser = argparse.ArgumentParser(prog="python -m simulations.benchmarks.peer_benchmark")
    parser.add_argument("--dataset", choices=DATASET_NAMES, default="mnist")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help=f"default {DEFAULT_DATA}")
    parser.add_argument("--models", type=listed(str, MODEL_NAMES), default=("cnn", "vgg11"))
    parser.add_argument(
        "--width-multiplier",
        type=float,
        default=VGG_WIDTH,
        help=f"channel multiplier of {' and '.join(WIDTH_MODELS)} (default {VGG_WIDTH}; 1: full width)",
    )
    parser.add_argument("--clients", type=listed(int), default=(2, 4, 8))
    parser.add_argument("--alpha", type=listed(float), default=(0.1, 0.5))
    parser.add_argument("--init", type=listed(str, INITS), default=("independent", "shared"))
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--epochs", type=int, default=5, help="local epochs (default 5)")
    parser.add_argument("--calibration-size", type=int, default=200)
    parser.add_argument("--evaluation-size", type=int, default=None)
    parser.add_argument("--output-dir", type=Path, default=None)
    return parser


def settings_of(args: argparse.Namespace) -> list[Setting]:
    """Every (model, init, K, alpha, seed) of the grid, as the harness's settings."""
    data_dir = None if args.dataset == "digits" else str(args.data_dir.expanduser().resolve())
    return [
        Setting(
            dataset=args.dataset,
            data_dir=data_dir,
            model=model,
            width_multiplier=args.width_multiplier if model in WIDTH_MODELS else None,
            num_clients=k,
            alpha=alpha,
            init=init,
            seed=seed,
            epochs=args.epochs,
            calibration_size=args.calibration_size,
            evaluation_size=args.evaluation_size,
        )
        for model in args.models
        for init in args.init
        for k in args.clients
        for alpha in args.alpha
        for seed in range(args.seeds)
    ]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the grid, print and write the tables, the JSON and the plot; return the JSON document."""
    args = build_parser().parse_args(argv)
    output = args.output_dir or Path("outputs") / f"peer_benchmark-{time.strftime('%Y%m%d-%H%M%S')}"
    output.mkdir(parents=True, exist_ok=True)
    command = shlex.join(
        ["python", "-m", "simulations.benchmarks.peer_benchmark", *(sys.argv[1:] if argv is None else argv)]
    )
    options = MethodOptions(
        variants=("linear",), importances=("uniform",), central=False, peers=tuple(PEER_METHODS)
    )
    settings = settings_of(args)
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, 1 thread per process"
    )
    started = time.perf_counter()
    results: list[SettingResult] = []

    def done(result: SettingResult) -> None:
        results.append(result)
        s = result.setting
        print(
            f"[{len(results)}/{len(settings)}] {s.model} {s.init} K={s.num_clients} alpha={s.alpha} "
            f"seed {s.seed}: {result.seconds:.0f} s",
            flush=True,
        )
        write(output, document(results, command, machine, time.perf_counter() - started))

    with _threads(1):
        run_sweep(settings, options, progress=False, flower_logs=False, on_result=done)
    final = document(results, command, machine, time.perf_counter() - started)
    paths = write(output, final)
    print(final["markdown"])
    print(f"wrote {', '.join(map(str, paths))}")
    return final


def summaries(results: Sequence[SettingResult]) -> list[tuple[str, SummaryRow]]:
    """(model, summary row) for every model, init, K, alpha and method of `METHODS`; the model as
    `Setting.model_label` names it, with its width where set."""
    rows = []
    for model in dict.fromkeys(r.setting.model_label for r in results):
        for row in summarize([r for r in results if r.setting.model_label == model]):
            if row.method in METHODS:
                rows.append((model, row))
    return rows


def document(results: Sequence[SettingResult], command: str, machine: str, seconds: float) -> dict[str, Any]:
    first = results[0].setting
    rows = summaries(results)
    setting = {
        "command": command,
        "machine": machine,
        "dataset": first.dataset,
        "data_dir": first.data_dir,
        "models": list(dict.fromkeys(r.setting.model_label for r in results)),
        "partitioning": "dirichlet",
        "epochs": first.epochs,
        "calibration_size": first.calibration_size,
        "evaluation_size": results[0].evaluation_size,
        "seeds": sorted({r.setting.seed for r in results}),
        "settings_run": len(results),
        "fedfuse": "FusionConfig() defaults (auto: closed form for these models, k-means, uniform "
        "importance), fusion weights measured on the calibration set (no client disclosure)",
        "seconds": round(seconds, 1),
    }
    return {
        "setting": setting,
        "rows": [{"model": model, **asdict(row)} for model, row in rows],
        "markdown": markdown(setting, rows),
    }


def markdown(setting: dict[str, Any], rows: Sequence[tuple[str, SummaryRow]]) -> str:
    """One table per (model, init): a row per method, a column per (K, alpha), accuracy mean ± std; then
    the mean merge seconds; a last line per column: FedFuse minus the best peer method."""
    lines = [
        f"`{setting['command']}`",
        "",
        f"{setting['dataset']} ({setting['data_dir']}), {', '.join(setting['models'])}, "
        f"Dirichlet label skew, {setting['epochs']} local epochs, calibration "
        f"{setting['calibration_size']}, evaluation {setting['evaluation_size']}, seeds {setting['seeds']}; "
        f"FedFuse: {setting['fedfuse']}; "
        f"{setting['machine']}; {setting['seconds']:.0f} s.",
    ]
    for model, init in dict.fromkeys((m, r.init) for m, r in rows):
        block = [r for m, r in rows if m == model and r.init == init]
        points = list(dict.fromkeys((r.num_clients, r.alpha) for r in block))
        cell = {(r.method, r.num_clients, r.alpha): r for r in block}
        header = [f"K={k} α={a}" for k, a in points]
        lines += ["", f"**{model}, {init} init** (accuracy, mean ± std over seeds)", ""]
        lines += ["| method | " + " | ".join(header) + " | merge s |", "|---" * (len(points) + 2) + "|"]
        for method in METHODS:
            found = [cell.get((method, *p)) for p in points]
            if not any(found):
                continue
            values = [f"{r.accuracy_mean:.3f} ± {r.accuracy_std:.3f}" if r else "" for r in found]
            secs = [r.fusion_seconds_mean for r in found if r and r.fusion_seconds_mean is not None]
            name = f"**{method}**" if method == FEDFUSE else method
            seconds = f"{sum(secs) / len(secs):.2f}" if secs else ""
            lines.append(f"| {name} | " + " | ".join(values) + f" | {seconds} |")
        gaps = []
        for p in points:
            peers = [cell[(m, *p)] for m in PEER_METHODS if (m, *p) in cell]
            best = max(peers, key=lambda r: r.accuracy_mean)
            gaps.append(f"{cell[(FEDFUSE, *p)].accuracy_mean - best.accuracy_mean:+.3f} ({best.method})")
        lines.append("| FedFuse − best peer | " + " | ".join(gaps) + " | |")
    return "\n".join(lines)


def write(folder: Path, doc: dict[str, Any]) -> list[Path]:
    (folder / "peers.json").write_text(json.dumps(doc, indent=1))
    (folder / "peers.md").write_text(doc["markdown"] + "\n")
    return [folder / "peers.json", folder / "peers.md", plot(doc, folder / "peers.png")]


def plot(doc: dict[str, Any], path: Path) -> Path:
    """Accuracy of every method at every (K, alpha), one panel per (model, init), error bars the std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    panels = list(dict.fromkeys((r["model"], r["init"]) for r in rows))
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for axis, (model, init) in zip(axes[0], panels):
        block = [r for r in rows if r["model"] == model and r["init"] == init]
        points = list(dict.fromkeys((r["num_clients"], r["alpha"]) for r in block))
        for method in METHODS:
            found = {(r["num_clients"], r["alpha"]): r for r in block if r["method"] == method}
            xs = [i for i, p in enumerate(points) if p in found]
            if xs:
                axis.errorbar(
                    xs,
                    [found[points[i]]["accuracy_mean"] for i in xs],
                    yerr=[found[points[i]]["accuracy_std"] for i in xs],
                    label=method,
                    marker="o",
                    linewidth=2.5 if method == FEDFUSE else 1,
                    capsize=2,
                )
        axis.set_xticks(range(len(points)), [f"K={k}\nα={a}" for k, a in points])
        axis.set_title(f"{model}, {init} init")
        axis.set_ylabel("accuracy")
        axis.set_ylim(0, 1)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


class _threads:
    """torch's CPU threads set to ``count`` within (the clients run side by side on few cores)."""

    def __init__(self, count: int) -> None:
        self.count, self.previous = count, torch.get_num_threads()

    def __enter__(self) -> None:
        torch.set_num_threads(self.count)

    def __exit__(self, *_: object) -> None:
        torch.set_num_threads(self.previous)


if __name__ == "__main__":
    main()
