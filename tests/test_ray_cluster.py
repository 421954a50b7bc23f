"""``aanas search --engine ray --address HOST:PORT`` on a real two-node Ray cluster.

The module starts its own cluster once (``ray start --head`` on 127.0.0.1, a free port, its own
temp dir) plus a second node process (``ray start --address ...``, another working directory, a
custom resource), runs the CLI against it and checks where the trials ran. Both ``ray start``
processes run with ``--block`` in their own session; teardown kills exactly those sessions
(never ``ray stop``, which would stop every Ray on the machine, other users' included).

The cluster declares GPUs (head 2, second node 1) that this CPU machine does not have: Ray
schedules ``--gpus-per-trial 1`` on them and sets one ``CUDA_VISIBLE_DEVICES`` id per trial,
which each trial records; the models still run on the CPU (no CUDA visible to torch).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from aanas.results import read_jsonl

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 180  # `ray start` takes 10-20 s on 2 loaded cores; be generous
NODE2_RESOURCE = "aanas_node2"


@dataclass(frozen=True)
class Cluster:
    address: str
    env: dict[str, str]
    nodes: dict[str, dict[str, float]]  # Ray node id -> its resources
    tmp: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _session_pids(sid: int) -> list[int]:
    """Every live process in session ``sid`` (the ``ray start`` process and what it spawned)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) == sid:
                pids.append(int(entry.name))
        except (ProcessLookupError, PermissionError):
            continue
    return pids


def _kill_session(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the ``ray start --block`` process (it stops its node), then SIGKILL whatever of
    its session is left: only processes this fixture started."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    for pid in _session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def _wait_for(what: str, check, timeout: float, procs) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for p, log in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: `ray start` exited {p.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout} s")
        time.sleep(0.25)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Cluster]:
    # short path: Ray's unix sockets live under the temp dir (108-character limit)
    tmp = Path(tempfile.mkdtemp(prefix="aanas-ray-"))
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = dict(os.environ)
    # One token-auth mode for the nodes and every driver (Ray >= 2.5x enables it by default
    # for new clusters and a driver without the same mode is refused), with this cluster's own
    # token in the environment they all share: `ray start` only creates ~/.ray/auth_token for
    # a local ray.init(), so on a fresh machine a head node started first found no token and
    # exited (seen on a clean machine; it passed where an earlier ray.init() had left the file).
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # Ray's own token format: 256 random bits
    env.pop("RAY_ADDRESS", None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    ray_cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block"]
    head_log, node_log = tmp / "head.log", tmp / "node2.log"
    procs: list[subprocess.Popen[bytes]] = []
    node2_cwd = tmp / "node2-cwd"
    node2_cwd.mkdir()
    try:
        head = subprocess.Popen(
            [
                *ray_cmd,
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={port}",
                "--num-cpus=1",
                "--num-gpus=2",
                "--include-dashboard=false",
                f"--dashboard-port={_free_port()}",
                "--disable-usage-stats",
                f"--temp-dir={tmp / 'h'}",
            ],
            env=env,
            cwd=tmp,
            stdout=head_log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(head)
        # `ray start` writes this file once the head's GCS is up (and not into /tmp/ray, so
        # other users' `ray.init()` never find this cluster)
        ready = tmp / "h" / "ray_current_cluster"
        _wait_for("head node", ready.is_file, START_TIMEOUT_S, [(head, head_log)])
        node2 = subprocess.Popen(
            [
                *ray_cmd,
                f"--address={address}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=1",
                "--num-gpus=1",
                f"--resources={json.dumps({NODE2_RESOURCE: 1})}",
                "--disable-usage-stats",
                f"--temp-dir={tmp / 'n'}",
            ],
            env=env,
            cwd=node2_cwd,
            stdout=node_log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(node2)
        probe = (
            "import json, sys, ray; ray.init(address=sys.argv[1], log_to_driver=False); "
            "print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))"
        )
        nodes: dict[str, dict[str, float]] = {}

        def two_nodes() -> bool:
            out = subprocess.run(
                [sys.executable, "-c", probe, address],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            if out.returncode == 0:
                nodes.clear()
                nodes.update(json.loads(out.stdout.strip().splitlines()[-1]))
            return len(nodes) == 2

        _wait_for("second node", two_nodes, START_TIMEOUT_S, [(head, head_log), (node2, node_log)])
        yield Cluster(address=address, env=env, nodes=dict(nodes), tmp=tmp)
    finally:
        for proc in reversed(procs):
            _kill_session(proc)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_cli_search_runs_trials_on_both_nodes(ray_cluster: Cluster, tmp_path: Path) -> None:
    # Relative paths on the driver: a worker (another cwd, another machine) could not open them,
    # so this only passes if the space and the supernet travel through Ray's object store.
    driver_cwd = tmp_path / "driver"
    driver_cwd.mkdir()
    shutil.copy(REPO / "search_spaces" / "tiny.yaml", driver_cwd / "myspace.yaml")
    cmd = [
        sys.executable, "-m", "aanas", "search",
        "--engine", "ray", "--address", ray_cluster.address,
        "--space", "myspace.yaml", "--out", "run", "--no-progress",
        "--evaluator", "supernet", "--supernet-epochs", "1", "--max-train-batches", "2",
        "--recal-batches", "1", "--trials", "4", "--seed", "3",
        "--cpus-per-trial", "1", "--gpus-per-trial", "1",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=driver_cwd, env=ray_cluster.env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = driver_cwd / "run"
    rows = read_jsonl(run / "trials.jsonl")
    by_number = {r.number: r for r in rows}  # trials.jsonl is append-only: last row wins
    assert sorted(by_number) == [0, 1, 2, 3]
    results = list(by_number.values())
    assert all(r.state == "COMPLETE" and r.spec and r.macs and r.accuracy for r in results)

    # where each trial ran: "node=<id> host=<hostname> pid=<pid> gpus=<CUDA_VISIBLE_DEVICES>"
    where = [dict(part.split("=", 1) for part in r.worker.split()) for r in results]
    nodes = {w["node"] for w in where}
    assert nodes == set(ray_cluster.nodes), (nodes, ray_cluster.nodes)  # both nodes ran trials
    for w in where:
        resources = ray_cluster.nodes[w["node"]]
        # --gpus-per-trial 1: exactly one of that node's declared GPUs per trial
        assert w["gpus"] in {str(i) for i in range(int(resources["GPU"]))}, w
        assert int(w["pid"]) > 0 and w["host"] == socket.gethostname()
    node2 = [w for w in where if NODE2_RESOURCE in ray_cluster.nodes[w["node"]]]
    assert node2 and all(w["gpus"] == "0" for w in node2)  # the second node declared one GPU
    # the run directory is complete on the driver
    for name in ("trials.csv", "pareto.json", "summary.md", "best/spec.txt", "best/model.pt"):
        assert (run / name).is_file(), name
