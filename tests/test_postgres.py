"""A real PostgreSQL storage shared by `aanas search` workers (Optuna's multi-machine setup).

A session fixture starts a throw-away server (``initdb`` in a temporary folder, ``pg_ctl start``
on 127.0.0.1 and a free port, as the ``postgres`` user when run as root) and stops it at the
end. Workers each get their own run directory, as on separate machines, and share the study
through ``--storage postgresql://...``. When no server can be installed or started the tests
skip and say why.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_search_workers import check_study, load_study, start_workers, wait_all


def _pg_bindir() -> Path | None:
    """Folder of initdb/pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(debian[-1]).parent if debian else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a fresh PostgreSQL server on 127.0.0.1 (skips with the reason when impossible)."""
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.skip("psycopg2 is not installed (pip install psycopg2-binary)")
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin); "
            ".ci/run installs Debian's postgresql package"
        )
    root = Path(tempfile.mkdtemp(prefix="aanas-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: use the postgres account
        try:
            import pwd

            pg = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server")
        os.chmod(root, 0o755)
        os.chown(root, pg.pw_uid, pg.pw_gid)
        os.chown(sock, pg.pw_uid, pg.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    port = _free_port()

    def run(*cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120)

    init = run(str(bindir / "initdb"), "-D", str(data), "-U", "aanas", "--auth=trust", "-E",
               "UTF8", "--no-sync")  # fmt: skip
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb failed: {(init.stderr or init.stdout).strip()[-300:]}")
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c fsync=off"
    start = run(str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l",
                str(root / "server.log"), "-w", "-t", "60", "start")  # fmt: skip
    if start.returncode != 0:
        log = (root / "server.log").read_text() if (root / "server.log").is_file() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"pg_ctl start failed: {(start.stderr + log).strip()[-300:]}")
    try:
        yield f"postgresql+psycopg2://aanas@127.0.0.1:{port}/postgres"
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _rdb(url: str):
    import optuna

    return optuna.storages.RDBStorage(url)


@pytest.mark.slow
def test_three_workers_on_postgresql_then_resume_after_a_kill(tmp_path, postgres_url):
    """Three machines on one PostgreSQL study; one is killed (kill -9) in the middle of a trial.
    The survivors wait for its trial instead of leaving, mark it FAIL once its heartbeat has
    been silent for the grace period, run a replacement, and the study ends with exactly
    --trials counted trials; every machine's run directory agrees with the storage."""
    from optuna.trial import TrialState

    from aanas.results import read_jsonl

    trials = 9
    common = ["--storage", postgres_url, "--study-name", "pg-study", "--no-progress",
              "--supernet-epochs", "1", "--set", "heartbeat_s=1", "--set", "grace_s=4"]  # fmt: skip

    def args(k: int, n: int = trials) -> list[str]:  # one run directory per "machine"
        return ["search", "--out", str(tmp_path / f"machine{k}"), "--trials", str(n), *common]

    logs = tmp_path / "logs"
    (logs / "m0").mkdir(parents=True)
    (logs / "m0" / "hang").touch()  # machine 0's first evaluation never returns
    # each machine runs its own command (own --out); all are released by one "go" file
    procs = [start_workers(1, args(k), logs / f"m{k}", sleep=0.3, go=logs / "go")[0]
             for k in range(3)]  # fmt: skip
    (logs / "go").touch()
    victim = procs[0]
    evaluated = logs / "m0" / "evaluated.log"
    deadline = time.time() + 120
    while not (evaluated.is_file() and evaluated.read_text().split()):
        assert victim.poll() is None and time.time() < deadline
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)  # mid-trial: it hangs in its first evaluation
    victim.wait(10)
    outputs = wait_all(procs[1:])
    # the killed machine runs the same command again: the study is complete, it only joins
    # and rewrites its run directory from the storage
    (rerun,) = start_workers(1, args(0), logs / "m0-again", sleep=0.0)
    wait_all([rerun])
    all_evaluated = []  # the victim's evaluation never finished: a survivor may redo its spec
    for log in logs.glob("m[12]*/evaluated.log"):
        all_evaluated += log.read_text().split()
    study = load_study(_rdb(postgres_url), "pg-study")
    fts = check_study(study, trials, all_evaluated)
    assert study.user_attrs["aanas_workers"] == 4
    # (on a machine loaded enough to stall a survivor's heartbeat thread for grace_s, that
    # survivor's trial is lost too, and replaced the same way: allowed, counted below)
    all_lost = [t for t in fts if t.state == TrialState.FAIL and "result" not in t.user_attrs]
    (lost,) = [t for t in all_lost if f"-{victim.pid}-" in t.user_attrs["worker"]]
    # the replacements ran (not left WAITING): one trial more than requested per lost one
    assert len(fts) == trials + len(all_lost) and lost.number < fts[-1].number
    assert fts[-1].state == TrialState.COMPLETE
    # exactly one survivor found it stale (under the advisory lock) and said so
    said = f"trial {lost.number} lost: its worker sent no heartbeat for 4 s"
    assert sum(said in o for o in outputs) == 1, outputs
    stored = [(t.number, t.state.name) for t in fts]
    for k in range(3):
        records = read_jsonl(tmp_path / f"machine{k}" / "trials.jsonl")
        assert [(r.number, "PRUNED" if r.state == "REJECTED" else r.state) for r in records] == (
            stored
        ), k
        record = {r.number: r for r in records}[lost.number]
        assert record.error.startswith("lost: its worker sent no heartbeat for the grace period")
    workers = {t.user_attrs["worker"] for t in fts}
    assert len(workers) == 3, workers  # the victim and the two survivors; the rerun ran none
