"""The harness's command line: what a sweep expands into, and clear refusals of options that do not fit."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedfuse.fusion.config import VARIANTS
from simulations.one_shot.cli import build_parser, main, plan


def planned(*argv: str):
    return plan(build_parser().parse_args(list(argv)))


def test_the_default_run_is_one_digits_setting_with_five_dirichlet_clients_and_every_fedfuse_variant() -> (
    None
):
    settings, options = planned()
    assert len(settings) == 1
    setting = settings[0]
    assert (setting.dataset, setting.num_clients, setting.partitioning, setting.alpha) == (
        "digits",
        5,
        "dirichlet",
        0.5,
    )
    assert (setting.init, setting.seed, setting.threads, setting.fedavg_rounds) == ("shared", 0, 1, 0)
    assert options.variants == VARIANTS and options.importances == ("uniform",) and options.central
    assert options.output_targets == ("labels",)


def test_a_sweep_is_every_combination_of_init_clients_alpha_and_seed() -> None:
    settings, _ = planned(
        "--alpha", "0.1,0.3,1.0", "--clients", "2,4,8", "--seeds", "3", "--init", "shared,independent"
    )
    points = [(s.init, s.num_clients, s.alpha, s.seed) for s in settings]
    assert len(points) == len(set(points)) == 2 * 3 * 3 * 3
    assert points[:4] == [
        ("shared", 2, 0.1, 0),
        ("shared", 2, 0.1, 1),
        ("shared", 2, 0.1, 2),
        ("shared", 2, 0.3, 0),
    ]


def test_partitionings_get_their_own_parameter_and_only_theirs() -> None:
    (iid,), _ = planned("--partitioning", "iid")
    (pathological,), _ = planned("--partitioning", "pathological")
    (skew,), _ = planned("--partitioning", "quantity-skew", "--alpha", "2")
    assert (iid.alpha, iid.classes_per_client) == (None, None)
    assert (pathological.alpha, pathological.classes_per_client) == (None, 2)
    assert (skew.alpha, skew.classes_per_client) == (2.0, None)


def test_the_data_folder_is_made_absolute_for_the_clients_worker_processes(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (setting,), _ = planned("--dataset", "mnist", "--data-dir", "data/mnist")
    assert setting.data_dir == str(tmp_path / "data" / "mnist")
    (digits,), _ = planned()
    assert digits.data_dir is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--partitioning", "iid", "--alpha", "0.3"],
            "--alpha applies to dirichlet and quantity-skew, not iid",
        ),
        (["--classes-per-client", "3"], "--classes-per-client applies to pathological, not dirichlet"),
        (["--clients", "1"], "--clients must be an int >= 2"),
        (["--clients", "2,x"], "'2,x' is not a comma-separated list of int"),
        (["--alpha", "0.3,0.3"], "repeats a value"),
        (["--importance", "saliency"], r"unknown \['saliency'\]"),
        (["--output-targets", "labels,softmax"], r"--output-targets: unknown \['softmax'\]"),
        (["--epochs", "10", "--fedavg-rounds", "3"], "must share the 10 local epochs evenly"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--polish-epochs", "-1"], "--polish-epochs: at least 0, got -1"),
        (["--width-multiplier", "0.25"], "--width-multiplier applies to vgg11 and vgg11-bn, not mlp"),
        (["--model", "vgg11", "--width-multiplier", "0"], "--width-multiplier must be > 0"),
        (["--dataset", "mnist"], r"set data_dir \(--data-dir\)"),
        (["--dataset", "mnist", "--data-dir", "/nonexistent"], "IDX file not found"),
        (["--calibration-size", "1700"], r"--calibration-size \+ --evaluation-size = 2059 exceeds the 1797"),
        (["--calibration-size", "1000", "--evaluation-size", "797"], "leave none of the 1797 examples"),
        (["--evaluation-size", "0"], "--evaluation-size must be an int >= 1, got 0"),
        (["--alpha", "0"], r"--alpha must be > 0, got 0\.0"),
        (
            ["--partitioning", "pathological", "--classes-per-client", "11"],
            r"--classes-per-client must be in \[1, 10\]",
        ),
        (["--clients", "5,200"], "200 clients of at least min_partition_size=10 need 2000 examples"),
        (
            ["--model", "vit", "--variants", "linear"],
            r"linear variant cannot fuse 'vit' models \(--variants chooses the variants run.*\): the linear "
            "variant fits Linear/Conv levels",
        ),
    ],
)
def test_options_that_do_not_fit_are_refused_before_any_training(
    argv, message, capsys, tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()  # nothing was run or written


def test_a_mistyped_option_is_answered_before_pytorch_or_flower_load() -> None:
    """A fast start: argparse and the setting's checks run on light modules only, naming the flags."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from simulations.one_shot.cli import main\n"
        "for argv in (['--dataset', 'typo'], ['--clients', '1']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted({'torch', 'flwr', 'sklearn'} & set(sys.modules)))\n"
    )
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert finished.stdout.strip() == "[]"
    assert "argument --dataset: invalid choice: 'typo'" in finished.stderr
    assert "--clients must be an int >= 2, got 1" in finished.stderr
