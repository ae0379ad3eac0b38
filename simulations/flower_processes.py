"""Starting and stopping real Flower processes (SuperLink, SuperNodes, ``flwr run``) for end-to-end tests
and benchmarks.

Every process is started here, by this run, in a temporary ``FLWR_HOME``, with output to a log
file and on free loopback ports; `Processes.stop` ends each one by its PID, and the processes it
spawned (SuperExec, ServerApp, ClientApps, Ray) by theirs, found through /proc. Flower detaches some
of those into sessions of their own, so a process-group kill would miss them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

APP_DIR = Path(__file__).resolve().parent / "flower_app"
QUICKSTART_DIR = APP_DIR.parent / "quickstart_app"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flower_env(flwr_home: Path, local_superlink_port: int | None = None) -> dict[str, str]:
    """The environment of every Flower process: offline, isolated in ``flwr_home``."""
    env = dict(os.environ)
    # The Flower executables of this interpreter's environment, also for the processes Flower spawns.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"  # no `uv sync`: we are offline
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    if local_superlink_port is not None:  # where `flwr run` looks for the local simulation SuperLink
        env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(local_superlink_port)
    return env


class Processes:
    """The long-running processes of one test; `stop` ends them all, whatever happened in between."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[subprocess.Popen] = []
        self._logs: list[IO[bytes]] = []

    def start(self, name: str, command: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")  # closed in stop(), after the process ends
        self._logs.append(log)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        self.started.append(process)
        return process

    def stop(self, grace: float = 15.0) -> list[int]:
        """SIGTERM every started process, wait ``grace`` seconds, then SIGKILL what is left of the trees.

        Returns the PIDs of the trees, so that a test can check that none is left.
        """
        tree = [pid for process in self.started for pid in [process.pid, *descendants(process.pid)]]
        for process in self.started:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + grace
        for process in self.started:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        survivors = [pid for pid in tree if is_running(pid)]  # spawned ones that outlived their parent
        for pid in survivors:
            with contextlib.suppress(ProcessLookupError):  # it may have exited meanwhile
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(is_running(pid) for pid in survivors) and time.monotonic() < deadline:
            time.sleep(0.1)  # SIGKILL is delivered asynchronously
        for log in self._logs:
            log.close()
        return tree

    def logs(self) -> str:
        """Every log's tail, for an assertion message that shows what went wrong."""
        tails = []
        for path in sorted(self.log_dir.glob("*.log")):
            tails.append(f"--- {path.name} ---\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(tails)


@contextlib.contextmanager
def simulation_superlink(home: Path) -> Iterator[dict[str, str]]:
    """A simulation SuperLink on a free port, as `flwr run` would start one, but started (and stopped, with
    everything it spawned) here; yields the environment in which `flwr_run` uses it."""
    port = free_port()
    env = flower_env(home, local_superlink_port=port)
    processes = Processes(home)
    superlink = processes.start(
        "superlink",
        [
            "flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
            "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation",
        ],
        env,
        cwd=home,
    )  # fmt: skip
    try:
        # Healthy before `flwr run` probes the port; else it would start a SuperLink of its own.
        wait_until_healthy(port, superlink)
        yield env
    finally:
        processes.stop()


def wait_until_healthy(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    """Wait for a SuperLink's HTTP health endpoint on ``port``, as `flwr run` does for its local one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the SuperLink exited with code {process.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:  # not listening yet
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no healthy SuperLink on 127.0.0.1:{port} within {timeout:g} s")


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` in the parent tree, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _ppid(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def is_running(pid: int) -> bool:
    """Alive and not a zombie (a zombie has exited; only its parent's wait is missing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone meanwhile
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def flwr_run(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """``flwr run <args> --stream``, bounded by ``timeout`` seconds; output captured for the assertions."""
    return subprocess.run(
        ["flwr", "run", *args, "--stream"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
