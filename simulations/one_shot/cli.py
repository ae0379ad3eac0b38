"""The command line: ``python -m simulations.one_shot [options]`` (``--help`` lists them).

Options that take a comma-separated list (``--clients``, ``--alpha``, ``--init``, ``--importance``,
``--variants``) span a sweep with ``--seeds``: every combination is one Flower run, each reported as it
finishes, and a table over seeds closes the run.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedfuse.models import MODEL_NAMES
from simulations.dataset_names import DATASET_NAMES, SPLITS
from simulations.one_shot.setting import FUSION_WEIGHTS, INITS, Setting
from simulations.partitioning import ALPHA_PARTITIONINGS, PARTITIONINGS

if TYPE_CHECKING:
    from simulations.one_shot.methods import MethodOptions

# Only light modules above: the options are checked before PyTorch, Flower and the engine load, so a
# mistyped option is answered at once; the rest is imported where it is used.

#: The flag that sets each `Setting` field, so that a setting's error names what the user typed.
FLAGS = {
    "dataset": "--dataset",
    "data_dir": "--data-dir",
    "split": "--split",
    "model": "--model",
    "width_multiplier": "--width-multiplier",
    "num_clients": "--clients",
    "partitioning": "--partitioning",
    "alpha": "--alpha",
    "classes_per_client": "--classes-per-client",
    "init": "--init",
    "seed": "--seeds",
    "calibration_size": "--calibration-size",
    "evaluation_size": "--evaluation-size",
    "epochs": "--epochs",
    "lr": "--lr",
    "batch_size": "--batch-size",
    "fedavg_rounds": "--fedavg-rounds",
    "threads": "--threads",
}

DEFAULTS = Setting()
DEFAULT_ALPHA = 0.5
DEFAULT_CLASSES_PER_CLIENT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.one_shot",
        description="One-shot federated learning on non-IID data: K clients train once through Flower's "
        "simulation runtime; their models are merged by FedFuse and by FedAvg, and compared with each "
        "client alone, the clients' ensembles and, optionally, multi-round FedAvg and central training.",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASET_NAMES, default=DEFAULTS.dataset, help="default: digits")
    data.add_argument(
        "--data-dir",
        default=None,
        help="folder of the data files: MNIST-format IDX files (mnist, fashion-mnist, kmnist; e.g. "
        "../shared/data/mnist) or the cifar-10-batches-py folder (cifar10); not needed for digits",
    )
    data.add_argument(
        "--split",
        choices=SPLITS,
        default=DEFAULTS.split,
        help="which split of the files to use (default t10k)",
    )
    data.add_argument(
        "--calibration-size",
        type=int,
        default=DEFAULTS.calibration_size,
        help=f"server-side, class-balanced examples FedFuse fuses on (default {DEFAULTS.calibration_size})",
    )
    data.add_argument(
        "--evaluation-size", type=int, default=None, help="held-out evaluation examples (default: a fifth)"
    )

    federation = parser.add_argument_group("federation")
    federation.add_argument(
        "--clients", type=_list(int), default=(DEFAULTS.num_clients,), help="K, or a list (default 5)"
    )
    federation.add_argument(
        "--partitioning", choices=PARTITIONINGS, default=DEFAULTS.partitioning, help="default: dirichlet"
    )
    federation.add_argument(
        "--alpha",
        type=_list(float),
        default=None,
        help=f"concentration of dirichlet (label skew) and quantity-skew, or a list; smaller is more "
        f"skewed (default {DEFAULT_ALPHA})",
    )
    federation.add_argument(
        "--classes-per-client",
        type=int,
        default=None,
        help=f"classes each client holds under pathological (default {DEFAULT_CLASSES_PER_CLIENT})",
    )
    federation.add_argument(
        "--init",
        type=_list(str, INITS),
        default=(DEFAULTS.init,),
        help="shared: every client starts from the global model (Flower's usual way); independent: each "
        "from its own seeded random init; or both, comma-separated (default shared)",
    )
    federation.add_argument(
        "--seeds", type=int, default=1, help="run seeds 0, 1, ..., N-1 of every setting (default 1)"
    )

    training = parser.add_argument_group("training")
    training.add_argument(
        "--model", choices=MODEL_NAMES, default=DEFAULTS.model, help="zoo model (default mlp)"
    )
    training.add_argument(
        "--width-multiplier",
        type=float,
        default=None,
        help="scales the channels of vgg11 and vgg11-bn (e.g. 0.25: 0.6M weights on MNIST instead of "
        "9.5M; default: the full width)",
    )
    training.add_argument(
        "--epochs", type=int, default=DEFAULTS.epochs, help=f"local epochs (default {DEFAULTS.epochs})"
    )
    training.add_argument(
        "--lr", type=float, default=DEFAULTS.lr, help=f"Adam's learning rate ({DEFAULTS.lr})"
    )
    training.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="default 32")

    methods = parser.add_argument_group("methods")
    methods.add_argument(
        "--importance",
        type=_list(str),
        default=("uniform",),
        help="FedFuse importance method(s): uniform, gradient_x_activation, conductance, deeplift "
        "(default uniform)",
    )
    methods.add_argument(
        "--output-targets",
        type=_list(str),
        default=("labels",),
        help="FedFuse output-layer target(s): labels, logits, log_probabilities, auto "
        "(FusionConfig.output_target; default labels); a run other than labels is named after it",
    )
    methods.add_argument(
        "--variants",
        type=_list(str),
        default=None,
        help="FedFuse variant(s): linear, gradient (default: both)",
    )
    methods.add_argument(
        "--fusion-weights",
        choices=FUSION_WEIGHTS,
        default="calibration",
        help="what FedFuse weights clients by: what the server measures on its calibration set "
        "(default: nothing disclosed), their per-class label counts, or their example counts",
    )
    methods.add_argument(
        "--polish-epochs",
        type=int,
        default=0,
        metavar="N",
        help="also score every FedFuse run polished on the calibration set for at most N epochs "
        "(FusionConfig.polish_epochs; default 0: not)",
    )
    methods.add_argument(
        "--methods",
        type=_list(str),
        default=(),
        help="peer methods run on the same client models, comma-separated: Git Re-Basin, OT fusion, "
        "RegMean, distillation and Flower's strategies (`simulations.baselines.PEER_METHODS`; a wrong "
        "name lists them; default: none); with --fedavg-rounds R, each Flower strategy (flwr-*) also "
        "runs its own R rounds",
    )
    methods.add_argument(
        "--fedavg-rounds",
        type=int,
        default=0,
        metavar="R",
        help="also run the multi-round references, each R rounds of epochs/R local epochs from the shared "
        "init: FedAvg, and every Flower strategy (flwr-*) in --methods, FedProx's proximal term acting "
        "in the clients' training (default: off)",
    )
    methods.add_argument(
        "--no-central", action="store_true", help="skip central training on the pooled client data"
    )

    run = parser.add_argument_group("run")
    run.add_argument(
        "--threads",
        type=int,
        default=DEFAULTS.threads,
        help="torch CPU threads per process (default 1: tiny models run fastest on one, above all when "
        "the clients run side by side)",
    )
    run.add_argument(
        "--output-dir", type=Path, default=None, help="where results go (default outputs/one_shot-<time>)"
    )
    run.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    run.add_argument("--flower-logs", action="store_true", help="show Flower's own log, not only its errors")
    return parser


def plan(args: argparse.Namespace) -> tuple[list[Setting], MethodOptions]:
    """The settings of the sweep (init, K, alpha, seed: every combination) and the methods to run.

    ``--data-dir`` is made absolute: the ClientApps resolve it in their own worker processes.

    Raises:
        ValueError: options that do not fit together, naming them.
    """
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    if args.partitioning in ALPHA_PARTITIONINGS:
        alphas = args.alpha or (DEFAULT_ALPHA,)
    elif args.alpha is not None:
        raise ValueError(f"--alpha applies to {' and '.join(ALPHA_PARTITIONINGS)}, not {args.partitioning}")
    else:
        alphas = (None,)
    if args.classes_per_client is not None and args.partitioning != "pathological":
        raise ValueError(f"--classes-per-client applies to pathological, not {args.partitioning}")
    classes_per_client = args.classes_per_client
    if args.partitioning == "pathological" and classes_per_client is None:
        classes_per_client = DEFAULT_CLASSES_PER_CLIENT
    try:
        settings = [
            Setting(
                dataset=args.dataset,
                data_dir=str(Path(args.data_dir).expanduser().resolve()) if args.data_dir else None,
                split=args.split,
                model=args.model,
                width_multiplier=args.width_multiplier,
                num_clients=num_clients,
                partitioning=args.partitioning,
                alpha=alpha,
                classes_per_client=classes_per_client,
                init=init,
                seed=seed,
                calibration_size=args.calibration_size,
                evaluation_size=args.evaluation_size,
                epochs=args.epochs,
                lr=args.lr,
                batch_size=args.batch_size,
                fedavg_rounds=args.fedavg_rounds,
                threads=args.threads,
            )
            for init, num_clients, alpha, seed in itertools.product(
                args.init, args.clients, alphas, range(args.seeds)
            )
        ]
    except ValueError as error:
        raise ValueError(_with_flags(str(error))) from None
    # The engine's choices: the first options whose check loads PyTorch.
    from fedfuse.fusion.config import IMPORTANCES, OUTPUT_TARGETS, VARIANTS
    from simulations.baselines import PEER_METHODS
    from simulations.one_shot.methods import MethodOptions

    for flag, values, choices in (
        ("--variants", args.variants or (), VARIANTS),
        ("--importance", args.importance, IMPORTANCES),
        ("--output-targets", args.output_targets, OUTPUT_TARGETS),
        ("--methods", args.methods, tuple(PEER_METHODS)),
    ):
        unknown = [value for value in values if value not in choices]
        if unknown:
            raise ValueError(f"{flag}: unknown {unknown}; choose from {', '.join(choices)}")
    if args.polish_epochs < 0:
        raise ValueError(f"--polish-epochs: at least 0, got {args.polish_epochs}")
    options = MethodOptions(
        variants=args.variants or VARIANTS,
        importances=args.importance,
        output_targets=args.output_targets,
        fusion_weights=args.fusion_weights,
        central=not args.no_central,
        peers=args.methods,
        polish_epochs=args.polish_epochs,
    )
    return settings, options


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the harness; print every setting's table (and a sweep's table over seeds); write the results.

    Options that do not fit, and what `check_before_training` finds, end the program at once with
    argparse's usage line and the reason (exit status 2). Returns the JSON document written to
    ``results.json`` (see `outputs.results_document`).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings, options = plan(args)
    except ValueError as error:
        parser.error(str(error))
    with _torch_threads(args.threads):
        try:
            check_before_training(settings, options)
        except (ValueError, FileNotFoundError) as error:
            parser.error(_with_flags(str(error)))
        command = shlex.join(
            ["python", "-m", "simulations.one_shot", *(sys.argv[1:] if argv is None else argv)]
        )
        output_dir = args.output_dir or Path("outputs") / f"one_shot-{time.strftime('%Y%m%d-%H%M%S')}"
        output_dir.mkdir(parents=True, exist_ok=True)
        return _run(settings, options, args, command, output_dir)


def check_before_training(settings: Sequence[Setting], options: MethodOptions) -> None:
    """What can fail before any training, checked first: every setting's data, set sizes and partition,
    and that the engine fuses the model with every FedFuse configuration asked for (`check_fusable`;
    the model is the same in every setting).

    Raises:
        ValueError, FileNotFoundError: the first problem found, with its own message.
    """
    from simulations.one_shot.methods import check_fusable

    for setting in settings:
        split = setting.federated_split()
        if len(split.pool) == 0:
            raise ValueError(
                f"calibration_size {setting.calibration_size} and evaluation_size {len(split.evaluation)} "
                f"leave none of the {len(split.data)} examples for the clients"
            )
        setting.client_indices(split)
    check_fusable(settings[0], settings[0].federated_split(), options)


def _run(
    settings: list[Setting], options: MethodOptions, args: argparse.Namespace, command: str, output_dir: Path
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from simulations.one_shot.outputs import results_document, write_csv, write_json
    from simulations.one_shot.plots import ALPHA_PLOT, CLIENTS_PLOT, METHODS_PLOT, plot_methods, plot_sweep
    from simulations.one_shot.report import setting_report, summary_table, sweep_line
    from simulations.one_shot.summary import summarize
    from simulations.one_shot.sweep import run_sweep

    started = time.perf_counter()
    results = run_sweep(
        settings,
        options,
        progress=not args.no_progress,
        flower_logs=args.flower_logs,
        on_result=lambda result: tqdm.write(setting_report(result, options.fusion_weights) + "\n"),
    )
    summary = summarize(results)
    title = sweep_line(results)
    if len(results) > 1:
        print(f"{title}\n{summary_table(summary)}\n")
    document = results_document(results, summary, options, command, time.perf_counter() - started)
    written = [write_json(output_dir, document), write_csv(output_dir, results)]
    plot_methods(summary, output_dir / METHODS_PLOT, title)
    written.append(output_dir / METHODS_PLOT)
    for along, name in (("alpha", ALPHA_PLOT), ("num_clients", CLIENTS_PLOT)):
        if len({getattr(row, along) for row in summary}) > 1:  # a sweep along it
            plot_sweep(summary, along, output_dir / name, title)
            written.append(output_dir / name)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return document


def _with_flags(message: str) -> str:
    """An error in the words of the command line: ``Setting.num_clients`` becomes ``--clients``, and so
    does a bare ``num_clients`` (a field whose name no English word shares: one with an underscore, or
    ``alpha``)."""
    for field, flag in FLAGS.items():
        message = message.replace(f"Setting.{field} ", f"{flag} ")
        if "_" in field or field == "alpha":
            message = re.sub(rf"(?<![\w./-]){field}(?=[\s=]|$)(?! \(--)", flag, message)  # not "x (--x)"
    return message


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """torch's CPU threads set to ``count`` within, restored after."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _list(kind: Callable[[str], Any], choices: Sequence[str] | None = None) -> Callable[[str], tuple]:
    """An argparse type for a comma-separated list of ``kind`` values (optionally from ``choices``)."""

    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(item.strip()) for item in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of {kind.__name__}"
            ) from None
        unknown = [value for value in values if choices is not None and value not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(choices)}")
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"{text!r} repeats a value")
        return values

    return parse
