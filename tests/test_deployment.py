"""A real deployment on loopback: one SuperLink, three SuperNodes, and `flwr run` of the app with FedFuse.

The same steps as docs/flower.md gives for machines on a network, with 127.0.0.1 for every address.
Each process has a FLWR_HOME of its own, as it would on its own machine. Every process the test starts
is stopped by its PID (and the processes Flower spawned below them by theirs), even when it fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fedfuse_app.task import RunSettings, model_factory, split_for

from simulations.flower_processes import (
    APP_DIR,
    Processes,
    flower_env,
    flwr_run,
    free_port,
    is_running,
    wait_until_healthy,
)
from simulations.training import evaluate

REPO = APP_DIR.parents[1]
NODES = 3


def machine(tmp_path: Path, name: str) -> tuple[Path, dict[str, str]]:
    """A working directory and an environment with a FLWR_HOME of its own: one "machine"."""
    folder = tmp_path / name
    (folder / "flwr-home").mkdir(parents=True)
    return folder, flower_env(folder / "flwr-home")


@pytest.mark.slow
def test_a_superlink_and_three_supernodes_on_loopback_fuse_one_round_into_a_model_far_above_chance(tmp_path):
    processes = Processes(tmp_path)
    port = free_port()
    output = tmp_path / "outputs"
    try:
        cwd, env = machine(tmp_path, "superlink")
        superlink = processes.start(
            "superlink",
            ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
             "--disable-runtime-dependency-installation"],
            env,
            cwd,
        )  # fmt: skip
        wait_until_healthy(port, superlink)
        for node in range(NODES):
            cwd, env = machine(tmp_path, f"supernode-{node}")
            processes.start(
                f"supernode-{node}",
                ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                 "--port", str(free_port()), "--node-config", f"partition-id={node} num-partitions={NODES}"],
                env,
                cwd,
            )  # fmt: skip

        # The user's side: a named SuperLink connection in the CLI's config, then `flwr run`.
        _, env = machine(tmp_path, "user")
        (Path(env["FLWR_HOME"]) / "config.toml").write_text(
            '[superlink]\ndefault = "loopback"\n\n'
            f'[superlink.loopback]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
        )
        completed = flwr_run(
            [str(APP_DIR.relative_to(REPO)), "loopback", "-c", f"output-dir='{output}' min-nodes={NODES}"],
            env=env,
            cwd=REPO,
            timeout=300,
        )
        log = f"{completed.stdout[-4000:]}\n{completed.stderr[-3000:]}\n{processes.logs()}"
        assert completed.returncode == 0, log
        assert (output / "model.pt").is_file(), log
        metrics = json.loads((output / "metrics.json").read_text())
        assert metrics["train_metrics"]["1"]["fusion-clients"] == NODES, log
    finally:
        pids = processes.stop()

    assert not [pid for pid in pids if is_running(pid)]
    # The saved global model, scored afresh on the server's evaluation set: chance is 0.1.
    settings = RunSettings.from_run_config(metrics["run_config"])
    split = split_for(settings)
    model = model_factory(settings, split.data)()
    model.load_state_dict(torch.load(output / "model.pt"))
    evaluation = split.data.subset(split.evaluation)
    assert evaluate(model, evaluation.x, evaluation.y)["accuracy"] > 0.75
