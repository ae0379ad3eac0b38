"""The fusion benchmark runs end to end and reports what it measured, with its setting and machine."""

from __future__ import annotations

import json

import torch

from simulations.baselines import ENSEMBLES
from simulations.benchmarks.fusion_benchmark import main
from simulations.benchmarks.memory import peak_memory


def test_the_benchmark_reports_every_method_with_setting_and_machine(tmp_path, capsys) -> None:
    output = tmp_path / "bench.json"
    result = main(
        ["--dataset", "digits", "--models", "mlp", "--parents", "2", "--epochs", "5", "--calibration-size",
         "200", "--evaluation-size", "300", "--output", str(output)]
    )  # fmt: skip
    methods = [row["method"] for row in result["rows"]]
    assert methods == [
        "mean parent", "best parent", "averaging", "fedfuse linear uniform", "fedfuse gradient uniform",
        "fedfuse linear hungarian", *ENSEMBLES,
    ]  # fmt: skip
    fused = [row for row in result["rows"] if row["method"].startswith("fedfuse")]
    assert all(row["fusion_seconds"] > 0 and 0 <= row["accuracy"] <= 1 for row in fused)
    assert result["setting"]["seed"] == 0 and result["machine"]["cpus"] >= 1
    assert json.loads(output.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert "fedfuse linear uniform" in capsys.readouterr().out


def test_peak_memory_sees_a_large_allocation() -> None:
    with peak_memory() as memory:
        block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB
        block += 1
    del block
    assert memory["peak_mb"] is not None and memory["peak_mb"] >= 60
