"""Many `aanas search` workers on one study: real processes started together.

Each worker is a real `aanas search` process (``aanas.cli.main``) whose accuracy evaluator is a
fast stand-in (accuracy from the spec digest, a short sleep) and whose supernet optimisation is
skipped (the real SuperNet is built, saved and loaded), so the test checks the coordination,
not the learning:
all workers join (no schema race), the study ends with exactly ``--trials`` counted trials,
no architecture is evaluated twice, the supernet is trained once, and the run directory's
files agree with the storage.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from aanas.results import read_csv, read_jsonl

# Waits for a "go" file so that all workers call main() at the same moment (after their slow
# imports), logs every evaluation and every supernet training to files the test reads.
WORKER = textwrap.dedent(
    """
    import os, sys, time, types
    from pathlib import Path
    log_dir = Path({log_dir!r})
    import aanas.search.evaluators as ev
    import aanas.supernet as sn
    from aanas.cli import main
    from aanas.search import Evaluation

    class LoggedEvaluator:
        name = "logged"

        def evaluate(self, spec, *, seed, report):
            text = spec.encode()
            with open(log_dir / "evaluated.log", "a") as fh:
                fh.write(text + "\\n")
            if (log_dir / "hang").exists():  # a worker to be killed mid-trial
                time.sleep(600)
            time.sleep({sleep})
            acc = 0.5 + (int(spec.digest(), 16) % 1000) / 2500.0
            if report is not None:
                report(0, acc)
            return Evaluation(acc)

        def state_dict_for(self, spec, *, seed):
            return {{}}

    ev.build_evaluator = lambda *a, **k: LoggedEvaluator()
    # no data is read (loading digits imports scikit-learn: seconds per process)
    ev.build_data_for = lambda recipe, size: types.SimpleNamespace(num_classes=10)
    def logged_train(*a, **k):  # the real SuperNet is built, saved and loaded; only the
        # optimisation is skipped (seconds of CPU the coordination test does not need)
        with open(log_dir / "supernet_trained.log", "a") as fh:
            fh.write(str(os.getpid()) + "\\n")
        time.sleep(1.0)  # long enough that the other workers reach the lock and wait

    sn.train_supernet = logged_train
    (log_dir / f"ready-{{os.getpid()}}").touch()
    go = Path({go!r})
    while not go.exists():
        time.sleep(0.01)
    sys.exit(main(sys.argv[1:]))
    """
)


def start_workers(
    n: int, args: list[str], log_dir: Path, *, sleep: float = 0.05, go: Path | None = None
) -> list:
    """Start ``n`` worker processes of one command and release them together (or, with ``go``,
    leave them waiting for that file); returns the Popen objects."""
    log_dir.mkdir(parents=True, exist_ok=True)
    code = WORKER.format(log_dir=str(log_dir), sleep=sleep, go=str(go or log_dir / "go"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, *args],
            env=env,
            cwd=log_dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(n)
    ]
    deadline = time.time() + 120
    while len(list(log_dir.glob("ready-*"))) < n:
        for p in procs:
            assert p.poll() is None, p.stdout.read()
        assert time.time() < deadline, "workers did not start"
        time.sleep(0.05)
    if go is None:
        (log_dir / "go").touch()
    return procs


def wait_all(procs: list, timeout: float = 180) -> list[str]:
    """Wait for every worker; return their outputs (fail on a non-zero exit)."""
    outputs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outputs.append(out)
        assert p.returncode == 0, out
    return outputs


def load_study(storage, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=storage)


def journal(path: Path):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(str(path)))


def check_study(study, trials: int, evaluated: list[str]) -> list:
    """The invariants every multi-worker run must keep; returns the frozen trials."""
    from optuna.trial import TrialState

    from aanas.search.optuna_engine import counted

    fts = study.get_trials(deepcopy=False)
    assert not [t.number for t in fts if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert sum(counted(t) for t in fts) == trials  # exactly --trials, no overshoot
    # no architecture evaluated twice across workers ...
    assert len(evaluated) == len(set(evaluated)), sorted(evaluated)
    # ... and every counted trial's spec was evaluated once or reused from its twin
    results = {t.number: t.user_attrs["result"] for t in fts if counted(t)}
    for res in results.values():
        if "duplicate_of" in res["metrics"]:
            twin = results[int(res["metrics"]["duplicate_of"])]
            assert twin["spec"] == res["spec"] and twin["accuracy"] == res["accuracy"]
            assert "reused" in res["note"]
        else:
            assert res["spec"] in evaluated
    return fts


@pytest.mark.slow
def test_three_workers_started_together_share_one_run_dir(tmp_path):
    out = tmp_path / "run"
    trials = 12
    args = [
        "search", "--out", str(out), "--trials", str(trials), "--no-progress",
        "--supernet-epochs", "1", "--baselines", "resnet18",
    ]  # fmt: skip
    outputs = wait_all(start_workers(3, args, tmp_path / "logs"))
    evaluated = (tmp_path / "logs" / "evaluated.log").read_text().split()
    # the supernet: trained by one worker, loaded by the two others
    assert len((tmp_path / "logs" / "supernet_trained.log").read_text().split()) == 1
    study = load_study(journal(out / "study.journal"), out.resolve().name)
    fts = check_study(study, trials, evaluated)
    assert study.user_attrs["aanas_workers"] == 3  # all three joined
    workers = {t.user_attrs["worker"] for t in fts}
    assert len(workers) >= 2, workers  # the trials were shared out
    # the files agree with the storage (the last worker to finish rewrote them)
    stored = [(t.number, t.state.name) for t in fts]
    for records in (read_jsonl(out / "trials.jsonl"), read_csv(out / "trials.csv")):
        assert [(r.number, "PRUNED" if r.state == "REJECTED" else r.state) for r in records] == (
            stored
        )
    summary = (out / "summary.md").read_text()
    assert f"distinct architectures evaluated: {len(set(evaluated))}" in summary
    assert all("best:" in o for o in outputs)
    assert json.loads((out / "run.json").read_text())["storage"].endswith("study.journal")


def _worker_pid(ft) -> int:
    """The process id in a trial's worker name ``<host>-<pid>-<start ms>`` (-1: not set yet,
    the trial is being claimed)."""
    worker = ft.user_attrs.get("worker")
    return int(worker.rsplit("-", 2)[1]) if worker else -1


@pytest.mark.slow
def test_kill_9_worker_mid_trial_is_replaced_and_the_study_ends_exact(tmp_path):
    """kill -9 of a worker in the middle of a trial, once the others have finished everything
    else: they see its worker lock released, mark the trial FAIL (lost, with the reason), run a
    replacement (a worker with nothing left to ask for waits for running trials instead of
    exiting) and the study ends with exactly --trials counted trials; the files agree."""
    from optuna.trial import TrialState

    from aanas.search.optuna_engine import counted

    out = tmp_path / "run"
    trials = 6
    args = ["search", "--out", str(out), "--trials", str(trials), "--no-progress",
            "--supernet-epochs", "1"]  # fmt: skip
    logs = tmp_path / "logs"
    (logs / "victim").mkdir(parents=True)
    (logs / "victim" / "hang").touch()  # its first evaluation never returns
    (victim,) = start_workers(1, args, logs / "victim")
    hung = logs / "victim" / "evaluated.log"
    deadline = time.time() + 120
    while not (hung.is_file() and hung.read_text().split()):
        assert victim.poll() is None and time.time() < deadline, "the victim never evaluated"
        time.sleep(0.05)
    others = start_workers(2, args, logs / "others", sleep=0.05)
    lines: list[list[str]] = [[] for _ in others]
    readers = [
        threading.Thread(target=lambda p=p, buf=buf: buf.extend(p.stdout), daemon=True)
        for p, buf in zip(others, lines, strict=True)
    ]
    for r in readers:
        r.start()
    # The others finish every other trial, then wait for the victim's (they must not exit:
    # a trial lost after that would never be replaced); each says so once. One that was
    # handed the victim's architecture waits on that trial as its twin instead.
    study = load_study(journal(out / "study.journal"), out.resolve().name)
    waiting = "all trials asked for; waiting for the running ones"

    def twin_waiters() -> set[int]:
        fts = study.get_trials(deepcopy=False)
        (hung_trial,) = [t for t in fts if _worker_pid(t) == victim.pid]
        return {
            _worker_pid(t)
            for t in fts
            if t.state == TrialState.RUNNING
            and t.number != hung_trial.number
            and t.user_attrs.get("spec") == hung_trial.user_attrs["spec"]
        }

    while not all(
        any(waiting in line for line in buf) or p.pid in twin_waiters()
        for p, buf in zip(others, lines, strict=True)
    ):
        for p, buf in zip(others, lines, strict=True):
            assert p.poll() is None, "".join(buf)
        assert time.time() < deadline + 120, lines
        time.sleep(0.1)
    twins = len(twin_waiters())
    assert sum(counted(t) for t in study.get_trials(deepcopy=False)) == trials - 1 - twins
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    for p, r in zip(others, readers, strict=True):
        p.wait(timeout=180)
        r.join(timeout=10)
    outputs = ["".join(buf) for buf in lines]
    for p, output in zip(others, outputs, strict=True):
        assert p.returncode == 0, output

    fts = study.get_trials(deepcopy=False)
    (lost,) = [t for t in fts if _worker_pid(t) == victim.pid]  # its one and only trial
    assert lost.state == TrialState.FAIL and "result" not in lost.user_attrs
    assert lost.user_attrs["lost"].startswith(f"lost: worker {lost.user_attrs['worker']} ended")
    assert "killed or crashed" in lost.user_attrs["lost"]
    # the replacement ran: one trial more than requested, all but the lost one counted
    assert len(fts) == trials + 1 and lost.number < fts[-1].number
    assert not [t for t in fts if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    evaluated = (logs / "others" / "evaluated.log").read_text().split()
    check_study(study, trials, evaluated)  # the lost spec may be evaluated once, by a survivor
    assert all(_worker_pid(t) != victim.pid for t in fts if t.number > lost.number)
    # the files agree with the storage, and the lost record says what happened
    stored = [(t.number, t.state.name) for t in fts]
    for records in (read_jsonl(out / "trials.jsonl"), read_csv(out / "trials.csv")):
        assert [(r.number, "PRUNED" if r.state == "REJECTED" else r.state) for r in records] == (
            stored
        )
    record = {r.number: r for r in read_jsonl(out / "trials.jsonl")}[lost.number]
    assert record.state == "FAIL" and record.error == lost.user_attrs["lost"]
    summary = (out / "summary.md").read_text()
    assert "lost or interrupted trials (not counted, replaced by new ones): 1" in summary
    assert all("best:" in o for o in outputs)


def test_worker_seeds_differ_and_first_is_the_recipe_seed():
    from aanas.search.optuna_engine import worker_seed

    seeds = [worker_seed(7, k) for k in range(50)]
    assert seeds[0] == 7 and len(set(seeds)) == 50


def test_sigterm_marks_the_running_trial_then_a_rerun_ends_exact(tmp_path):
    out = tmp_path / "run"
    args = ["search", "--out", str(out), "--trials", "6", "--no-progress",
            "--evaluator", "train"]  # fmt: skip
    (proc,) = start_workers(1, args, tmp_path / "logs", sleep=0.5)
    deadline = time.time() + 60
    log = tmp_path / "logs" / "evaluated.log"
    while not (log.is_file() and len(log.read_text().split()) >= 3):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, output
    assert "interrupted by SIGTERM" in output and "run the same command to resume" in output
    records = read_jsonl(out / "trials.jsonl")
    study = load_study(journal(out / "study.journal"), out.resolve().name)
    assert [(r.number, r.state) for r in records] == [
        (t.number, t.state.name) for t in study.get_trials(deepcopy=False)
    ]
    interrupted = records[-1]
    assert interrupted.state == "FAIL" and interrupted.error.startswith("interrupted by SIGTERM")
    assert "RUNNING" not in {r.state for r in records}
    # the same command again: the study ends with exactly 6 counted trials
    wait_all(start_workers(1, args, tmp_path / "logs2", sleep=0.0))
    from aanas.search.optuna_engine import counted

    fts = study.get_trials(deepcopy=False)
    assert sum(counted(t) for t in fts) == 6 and len(fts) == 7
    assert fts[interrupted.number].state.name == "FAIL"
    final = read_jsonl(out / "trials.jsonl")
    assert [(r.number, r.state) for r in final] == [(t.number, t.state.name) for t in fts]
    assert (
        "lost or interrupted trials (not counted, replaced by new ones): 1"
        in (out / "summary.md").read_text()
    )


class CountingEvaluator:
    """Accuracy from the spec digest; remembers every spec it evaluated."""

    name = "counting"

    def __init__(self) -> None:
        self.seen: list[str] = []

    def evaluate(self, spec, *, seed, report):
        from aanas.search import Evaluation

        self.seen.append(spec.encode())
        return Evaluation(0.5 + (int(spec.digest(), 16) % 1000) / 2500.0)

    def state_dict_for(self, spec, *, seed):
        return {}


FOUR = """
name: four
base: "mnasnet:i32_n10_w1_d0:conv_c16_k3_s2:ds_r1_k3_s1_e1_c16_noskip/ir_r1_k3_s1_e3_c24:c0"
stages:
  1:
    depth: [1]
    kernel: [3, 5]
    expansion: [3, 6]
"""


@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_duplicate_suggestions_reuse_the_stored_result(tmp_path, storage):
    """A space of 4 architectures searched for 10 trials: 6 suggestions must repeat, and each
    repeat reuses the stored result instead of evaluating again."""
    from aanas.search import SearchRecipe, run_search

    space = tmp_path / "four.yaml"
    space.write_text(FOUR)
    url = f"sqlite:///{tmp_path / 'study.db'}" if storage == "sqlite" else None
    recipe = SearchRecipe(space=str(space), trials=10, sampler="random", storage=url)
    ev = CountingEvaluator()
    outcome = run_search(recipe, out=tmp_path / "run", evaluator=ev, progress=False)
    assert len(outcome.results) == 10 and all(r.state == "COMPLETE" for r in outcome.results)
    assert len(ev.seen) == len(set(ev.seen)) == 4
    reused = [r for r in outcome.results if "duplicate_of" in r.metrics]
    assert len(reused) == 6
    by_number = {r.number: r for r in outcome.results}
    for r in reused:
        twin = by_number[int(r.metrics["duplicate_of"])]
        assert (twin.spec, twin.accuracy, twin.reward) == (r.spec, r.accuracy, r.reward)
        assert "not re-evaluated" in r.note and r.wall_s == 0.0
    assert "distinct architectures evaluated: 4 (6 repeated suggestions" in outcome.summary


def test_progress_bar_counts_only_trials_counted_toward_the_total():
    """A lost or interrupted trial is replaced by another: the bar must not count it."""
    from aanas.results import TrialResult
    from aanas.search.runner import _Progress

    bar = _Progress(4, enabled=True, multi=False)
    try:
        bar.update(
            [
                TrialResult(number=0, state="COMPLETE", spec="a", accuracy=0.5, macs=10),
                TrialResult(number=1, state="FAIL", error="lost: worker w ended while it ran"),
                TrialResult(number=2, state="FAIL", error="interrupted by SIGTERM: not counted"),
                TrialResult(number=3, state="FAIL", error="NaN loss at epoch 1"),  # counted
                TrialResult(number=4, state="RUNNING", spec="b"),
                TrialResult(number=5, state="PRUNED", spec="c", accuracy=0.1, macs=10),
            ]
        )
        assert bar.bar.n == 3  # trials 0, 3 and 5
        bar.update([TrialResult(number=0, state="COMPLETE", spec="a", accuracy=0.5, macs=10)])
        assert bar.bar.n == 3  # the same trial handed over twice counts once
    finally:
        bar.close()
