"""aanas.search: scoring, objective, Optuna and Ray engines, run directory, CLI.

Engine tests use cheap stand-in evaluators (accuracy from the spec, no training), so they test
the search machinery; one test runs the real supernet evaluator end to end on digits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from aanas.cli import main
from aanas.results import read_jsonl
from aanas.search import Evaluation, Objective, RunDirectory, SearchRecipe, run_search, show_run
from aanas.search.scoring import HARD_EXPONENTS, SOFT_EXPONENTS, Budget, Scorer, mnasnet_reward
from aanas.space import SearchSpace

REPO = Path(__file__).resolve().parent.parent


class SpecEvaluator:
    """Deterministic pseudo-accuracy from the spec; counts evaluations and their MACs."""

    name = "fake"

    def __init__(self, fail_on: str = "", sleep: float = 0.0) -> None:
        self.seen: list[str] = []
        self.fail_on = fail_on  # substring of a spec string that makes evaluation raise
        self.sleep = sleep

    def evaluate(self, spec, *, seed, report):
        text = spec.encode()
        self.seen.append(text)
        if self.sleep:
            time.sleep(self.sleep)
        if self.fail_on and self.fail_on in text:
            from aanas.train import NonFiniteLossError

            raise NonFiniteLossError(0, 3, float("nan"))
        acc = 0.5 + (int(spec.digest(), 16) % 1000) / 2500.0  # in [0.5, 0.9)
        if report is not None:
            report(0, acc)
        return Evaluation(acc, {"val_loss": 1.0 - acc})

    def state_dict_for(self, spec, *, seed):
        return {}


def _fast(**kw) -> SearchRecipe:
    base = dict(trials=6, heartbeat_s=1, grace_s=2, evaluator="train")
    base.update(kw)
    return SearchRecipe(**base)


# --- scoring ----------------------------------------------------------------------------------


def test_mnasnet_reward_by_hand():
    # soft: 0.75 * (400/300)^-0.07
    assert mnasnet_reward(0.75, 400, 300, alpha=-0.07, beta=-0.07) == pytest.approx(
        0.75 * (4 / 3) ** -0.07
    )
    assert mnasnet_reward(0.75, 400, 300, alpha=-0.07, beta=-0.07) == pytest.approx(
        0.73505, abs=1e-5
    )
    # hard: no bonus under the target, T/LAT penalty above it
    a, b = HARD_EXPONENTS
    assert mnasnet_reward(0.8, 100, 300, alpha=a, beta=b) == pytest.approx(0.8)
    assert mnasnet_reward(0.8, 600, 300, alpha=a, beta=b) == pytest.approx(0.4)
    soft = Scorer("soft", "macs", 300.0)
    assert soft.exponents == SOFT_EXPONENTS
    assert soft.reward(0.8, 150) == pytest.approx(0.8 * 0.5**-0.07)
    assert Scorer("pareto").values(0.8, 5.0) == (0.8, 5.0)
    assert Scorer("pareto").directions == ("maximize", "minimize")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_macs": -1.0},
        {"engine": "hyperopt"},
        {"evaluator": "oracle"},
        {"trials": 0},
        {"sampler": "nsga2"},  # nsga2 needs --score pareto
        {"val_fraction": 0.0},
    ],
)
def test_recipe_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        SearchRecipe(**kwargs)
    with pytest.raises(ValueError):
        Scorer("soft", "macs", 0.0)
    with pytest.raises(ValueError):
        Budget(max_macs=-5)


# --- objective --------------------------------------------------------------------------------


def test_objective_hard_budget_never_evaluates_over_budget():
    space = SearchSpace.from_yaml("tiny")
    ev = SpecEvaluator()
    budget = 5e6
    obj = Objective(space, ev, scorer=Scorer("soft", "macs", 5e6), budget=Budget(max_macs=budget))
    rng = np.random.default_rng(0)
    results = [obj(space.sample_params(rng), number=i) for i in range(40)]
    states = {r.state for r in results}
    assert states == {"COMPLETE", "REJECTED"}
    for r in results:
        if r.state == "REJECTED":
            assert r.macs > budget and r.accuracy is None and "over budget" in r.note
            assert r.spec not in ev.seen
        else:
            assert r.macs <= budget and r.reward is not None
    assert len(ev.seen) == sum(r.state == "COMPLETE" for r in results)


def test_objective_records_failure_and_bad_params():
    space = SearchSpace.from_yaml("tiny")
    obj = Objective(space, SpecEvaluator(fail_on="c"), scorer=Scorer("accuracy"))
    r = obj(space.sample_params(np.random.default_rng(1)), number=3)
    assert r.state == "FAIL" and r.error.startswith("NonFiniteLossError: non-finite")
    bad = obj({"nope": 1}, number=4)
    assert bad.state == "FAIL" and "unknown parameter" in bad.error


# --- Optuna engine ------------------------------------------------------------------------------


def test_optuna_search_writes_run_dir(tmp_path):
    out = tmp_path / "run"
    outcome = run_search(_fast(trials=8), out=out, evaluator=SpecEvaluator(), progress=False)
    for name in (
        "run.json",
        "trials.csv",
        "trials.jsonl",
        "pareto.json",
        "pareto.png",
        "summary.md",
        "study.journal",
        "best/spec.txt",
        "best/metrics.json",
        "best/model.pt",
    ):
        assert (out / name).is_file(), name
    records = read_jsonl(out / "trials.jsonl")
    assert len(records) == 8 and all(r.spec.startswith("mnasnet:") for r in records)
    assert outcome.best is not None
    assert (out / "best/spec.txt").read_text().strip() == outcome.best.spec
    front = json.loads((out / "pareto.json").read_text())["front"]
    assert front and all(p["state"] == "COMPLETE" for p in front)
    text = show_run(out)
    assert outcome.best.spec in text and "Pareto front" in text


def test_failed_trial_is_recorded_and_search_continues(tmp_path):
    ev = SpecEvaluator(fail_on="k5")  # every spec with a 5x5 kernel "diverges"
    outcome = run_search(_fast(trials=8), out=tmp_path / "r", evaluator=ev, progress=False)
    failed = [r for r in outcome.results if r.state == "FAIL"]
    assert failed and all("NonFiniteLossError" in r.error for r in failed)
    assert any(r.state == "COMPLETE" for r in outcome.results)
    assert len(outcome.results) == 8
    assert "Failed trials" in (tmp_path / "r" / "summary.md").read_text()


def test_hard_budget_in_search_never_evaluates_over_budget(tmp_path):
    ev = SpecEvaluator()
    outcome = run_search(
        _fast(trials=10, max_macs=5e6), out=tmp_path / "r", evaluator=ev, progress=False
    )
    rejected = [r for r in outcome.results if r.state == "REJECTED"]
    assert rejected and all(r.spec not in ev.seen for r in rejected)
    assert all(r.macs <= 5e6 for r in outcome.results if r.state == "COMPLETE")


def test_pareto_mode_nsga2_with_budget(tmp_path):
    ev = SpecEvaluator()
    outcome = run_search(
        _fast(trials=10, score="pareto", max_macs=7e6),
        out=tmp_path / "r",
        evaluator=ev,
        progress=False,
    )
    assert outcome.front and all(r.macs <= 7e6 for r in outcome.front)
    assert all(r.reward is None for r in outcome.results)


def test_same_seed_same_first_specs(tmp_path):
    def specs(seed, name):
        o = run_search(
            _fast(trials=5, seed=seed),
            out=tmp_path / name,
            evaluator=SpecEvaluator(),
            progress=False,
        )
        return [r.spec for r in sorted(o.results, key=lambda r: r.number)]

    assert specs(3, "a") == specs(3, "b")
    assert specs(3, "a2") != specs(4, "c")


def test_resume_finishes_the_remainder(tmp_path):
    out = tmp_path / "r"
    first = run_search(_fast(trials=4), out=out, evaluator=SpecEvaluator(), progress=False)
    ev = SpecEvaluator()
    second = run_search(_fast(trials=7), out=out, evaluator=ev, progress=False)
    assert [r.number for r in second.results] == list(range(7))
    before = {r.number: r for r in first.results}
    for n, r in before.items():
        assert second.results[n].spec == r.spec and second.results[n].state == r.state
    assert len(ev.seen) <= 3  # only the remainder was evaluated (duplicates are not re-run)


# --- kill -9 and resume (a real `aanas search` process) ----------------------------------------

_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import aanas.search.evaluators as ev
    from test_search import SpecEvaluator
    ev.build_evaluator = lambda *a, **k: SpecEvaluator(sleep={sleep})
    from aanas.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def _cli(args, sleep):
    code = _SCRIPT.format(tests=str(Path(__file__).parent), sleep=sleep)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return [sys.executable, "-c", code, *args], env


def _stored_states(out: Path) -> list[tuple[int, str]]:
    """(number, state) of every trial in the run directory's journal storage, read by Optuna."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(str(out / "study.journal")))
    study = optuna.load_study(study_name=out.resolve().name, storage=storage)
    return [(t.number, t.state.name) for t in study.get_trials(deepcopy=False)]


def test_kill_9_then_resume(tmp_path):
    out = tmp_path / "r"
    args = [
        "search", "--evaluator", "train", "--trials", "6", "--out", str(out), "--no-progress",
        "--set", "heartbeat_s=1", "--set", "grace_s=2",
    ]  # fmt: skip
    cmd, env = _cli(args, sleep=1.0)
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.time() + 90
    try:
        while time.time() < deadline:
            jsonl = out / "trials.jsonl"
            if jsonl.is_file() and any(r.state == "COMPLETE" for r in read_jsonl(jsonl)):
                break
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.2)
        else:
            pytest.fail("no trial completed in time")
        time.sleep(0.5)  # likely mid-trial
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = {r.number: r for r in read_jsonl(out / "trials.jsonl") if r.state == "COMPLETE"}
    assert before and len(before) < 6
    assert "RUNNING" in [s for _, s in _stored_states(out)]  # the orphan of the killed worker
    # Rerun at once (no grace period to wait): the dead worker's file lock is gone.
    cmd, env = _cli(args, sleep=0.0)
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    after = read_jsonl(out / "trials.jsonl")
    numbers = [r.number for r in after]
    assert len(numbers) == len(set(numbers))
    by_number = {r.number: r for r in after}
    for n, r in before.items():  # no completed trial lost or changed
        assert by_number[n].state == "COMPLETE" and by_number[n].spec == r.spec
        assert by_number[n].accuracy == r.accuracy
    stored = _stored_states(out)
    # the files agree with the storage (a budget-REJECTED record is PRUNED in Optuna)
    assert [(r.number, "PRUNED" if r.state == "REJECTED" else r.state) for r in after] == stored
    states = [s for _, s in stored]
    assert "RUNNING" not in states and "WAITING" not in states
    lost = [r for r in after if r.state == "FAIL"]
    assert lost and all(r.error.startswith("lost: worker") for r in lost), lost
    assert len(after) - len(lost) == 6  # exactly --trials counted
    assert "lost or interrupted trials (not counted" in (out / "summary.md").read_text()
    assert "best:" in done.stdout and str(out) in done.stdout


# --- CLI errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--target-macs=-5M"], "target_macs"),
        (["--engine", "hyperopt"], "engine"),
        (["--space", "no_such_space"], "no_such_space"),
        (["--storage", "notadb://x"], "storage"),
        (["--trials", "many"], "trials"),
        (["--score", "pareto", "--sampler", "tpe", "--max-latency-ms=-1"], "max_latency_ms"),
    ],
)
def test_bad_flags_give_one_line_error(tmp_path, capsys, args, needle):
    code = main(["search", "--out", str(tmp_path / "r"), "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("aanas: error:") and err.count("\n") == 1 and needle in err


def test_show_errors(tmp_path, capsys):
    assert main(["show", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("aanas: error:")


# --- Ray Tune engine ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_search_writes_run_dir_and_resumes(tmp_path, ray_local):
    out = tmp_path / "ray"
    recipe = _fast(engine="ray", trials=4, cpus_per_trial=1)
    outcome = run_search(recipe, out=out, evaluator=SpecEvaluator(), progress=False)
    assert len(outcome.results) == 4
    assert sorted(r.number for r in outcome.results) == [0, 1, 2, 3]
    assert all(r.state == "COMPLETE" and r.spec for r in outcome.results)
    for name in ("trials.csv", "trials.jsonl", "pareto.json", "pareto.png", "summary.md",
                 "best/spec.txt", "best/metrics.json"):  # fmt: skip
        assert (out / name).is_file(), name
    assert (out / "ray").is_dir()
    # same command again: restored from the experiment folder, nothing lost
    again = run_search(recipe, out=out, evaluator=SpecEvaluator(), progress=False)
    assert [r.spec for r in again.results] == [r.spec for r in outcome.results]


def _specs_of_space(n: int, seed: int = 5) -> list[str]:
    space = SearchSpace.from_yaml("tiny")
    rng = np.random.default_rng(seed)
    return [space.sample(rng).encode() for _ in range(n)]


@pytest.mark.slow
def test_ray_search_evaluates_warm_start_points(tmp_path, ray_local):
    (first,) = _specs_of_space(1)
    recipe = _fast(engine="ray", trials=2, cpus_per_trial=1, warm_start=(first,))
    outcome = run_search(recipe, out=tmp_path / "ray", evaluator=SpecEvaluator(), progress=False)
    assert first in [r.spec for r in outcome.results]


# --- the cost a trial is judged on (measured, else predicted latency) ---------------------------

EIGHT = """
name: eight
base: "mnasnet:i32_n10_w1_d0:conv_c16_k3_s2:ds_r1_k3_s1_e1_c16_noskip/ir_r1_k3_s1_e3_c24:c0"
stages:
  1:
    depth: [1, 2]
    kernel: [3, 5]
    expansion: [3, 6]
"""


def test_predicted_latency_constrains_nsga2(tmp_path):
    """``--latency predict``: the budget reads the predicted latency (there is no measured one),
    so over-budget candidates are infeasible for NSGA-II, not feasible at latency 0."""
    import optuna

    from aanas.cost.latency import LatencyTable
    from aanas.search.optuna_engine import open_storage
    from aanas.spec import decode

    space_path = tmp_path / "eight.yaml"
    space_path.write_text(EIGHT)
    space = SearchSpace.from_yaml(space_path)
    rng = np.random.default_rng(0)
    specs = sorted({space.decode(space.sample_params(rng)).encode() for _ in range(200)})
    assert len(specs) == 8
    table = LatencyTable()  # synthetic entries: 0.1, 0.2, ... ms per distinct part
    for text in specs:
        for sig in table.missing(decode(text)):
            table.entries[sig] = 0.1 * (1 + len(table.entries))
    table.save(tmp_path / "lut.yaml")
    predicted = {s: table.predict(decode(s)) for s in specs}
    limit = 1.65  # between the 4th and 5th of the eight predictions: half are over
    assert sum(p > limit for p in predicted.values()) == 4
    recipe = SearchRecipe(
        space=str(space_path),
        trials=16,
        score="pareto",
        latency="predict",
        latency_table=str(tmp_path / "lut.yaml"),
        max_latency_ms=limit,
    )
    out = tmp_path / "run"
    ev = SpecEvaluator()
    outcome = run_search(recipe, out=out, evaluator=ev, progress=False)
    assert outcome.results and all(r.latency_ms is None for r in outcome.results)
    for r in outcome.results:
        assert r.latency_pred_ms == pytest.approx(predicted[r.spec])
        assert (r.state == "REJECTED") == (predicted[r.spec] > limit), r
    assert all(predicted[s] <= limit for s in ev.seen)  # over budget: never evaluated
    study = optuna.load_study(
        study_name=out.resolve().name,
        storage=open_storage(str(out / "study.journal"), heartbeat_s=1, grace_s=2),
    )
    for t in study.get_trials(deepcopy=False):
        (violation,) = [v for k, v in t.system_attrs.items() if k.startswith("constraints")]
        spec = t.user_attrs["spec"]
        assert (violation > 0) == (predicted[spec] > limit), (spec, violation)
    assert study.best_trials and all(
        predicted[t.user_attrs["spec"]] <= limit for t in study.best_trials
    )
    assert outcome.front and all(r.latency_pred_ms <= limit for r in outcome.front)


# --- start-up validation and exit codes -----------------------------------------------------------


def test_unknown_baseline_fails_before_any_work(tmp_path, capsys, monkeypatch):
    import aanas.search.evaluators as evaluators

    def boom(*a, **k):
        raise AssertionError("the supernet must not be prepared for a bad --baselines")

    monkeypatch.setattr(evaluators, "prepare_supernet", boom)
    monkeypatch.setattr(evaluators, "build_data_for", boom)
    code = main(["search", "--out", str(tmp_path / "r"), "--no-progress",
                 "--baselines", "resnet18,no_such_net"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no_such_net" in err and "baselines" in err
    assert not (tmp_path / "r" / "trials.jsonl").exists()


def test_search_with_no_completed_trial_exits_non_zero(tmp_path, capsys, monkeypatch):
    import aanas.search.evaluators as evaluators

    monkeypatch.setattr(evaluators, "build_evaluator", lambda *a, **k: SpecEvaluator(fail_on=":"))
    monkeypatch.setattr(
        evaluators, "build_data_for", lambda *a, **k: type("D", (), {"num_classes": 10})()
    )
    code = main(["search", "--out", str(tmp_path / "r"), "--no-progress", "--trials", "3",
                 "--evaluator", "train"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1
    assert "no trial completed" in captured.err and captured.err.count("\n") == 1
    assert "3 fail" in captured.out


# --- package shape (issue 11 item 8) ----------------------------------------------------------


def test_engines_share_one_interface_and_the_package_init_only_reexports():
    import ast

    import aanas.config
    import aanas.search
    from aanas.search import SearchEngine, engine_names, get_engine

    assert engine_names() == ["optuna", "ray"]
    for name in engine_names():
        cls = get_engine(name)
        assert issubclass(cls, SearchEngine) and cls.name == name
    with pytest.raises(ValueError, match="engine must be one of"):
        get_engine("hyperopt")
    assert aanas.search.SearchRecipe is aanas.config.SearchRecipe
    pkg = REPO / "aanas" / "search"
    init = ast.parse((pkg / "__init__.py").read_text())
    assert not [n for n in init.body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
    ray_src = (pkg / "ray_engine.py").read_text()
    assert "from aanas.search import" not in ray_src and "OptunaEngine" not in ray_src
    assert "build_objective" in ray_src  # the one builder of the objective, also in workers
    runner_src = (pkg / "runner.py").read_text()
    assert 'engine == "' not in runner_src and "engine == '" not in runner_src
    defined = [p.name for p in pkg.glob("*.py") if "class TrialFailedError" in p.read_text()]
    assert defined == ["objective.py"]


# --- wall-clock budget (--timeout-min) ---------------------------------------------------------


class _TimedEvaluator(SpecEvaluator):
    """SpecEvaluator that records the Unix time each evaluation starts and ends."""

    def __init__(self, sleep: float) -> None:
        super().__init__(sleep=sleep)
        self.spans: list[tuple[float, float]] = []

    def evaluate(self, spec, *, seed, report):
        start = time.time()
        try:
            return super().evaluate(spec, seed=seed, report=report)
        finally:
            self.spans.append((start, time.time()))


def _asked_times(out: Path) -> list[float]:
    """Unix time at which each trial of the run directory's study was asked for."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(str(out / "study.journal")))
    study = optuna.load_study(study_name=out.resolve().name, storage=storage)
    return [t.datetime_start.timestamp() for t in study.get_trials(deepcopy=False)]


def _sessions(out: Path) -> list[list[float]]:
    return sorted(json.loads((out / "time.json").read_text()).values())


def test_timeout_no_trial_starts_after_the_deadline_and_resume_counts_spent_time(tmp_path):
    out = tmp_path / "t"
    budget_s = 2.5
    ev = _TimedEvaluator(sleep=0.3)
    first = run_search(
        _fast(trials=1000, pruner="none", timeout_min=budget_s / 60),
        out=out,
        evaluator=ev,
        progress=False,
    )
    (session,) = _sessions(out)
    deadline = session[0] + budget_s  # the clock starts when run_search starts
    assert 1 <= len(ev.spans) < 1000
    asked = _asked_times(out)  # when Optuna created each trial: a trial "starts" there
    # (a spec proposed twice reuses the first result: asked >= evaluated)
    assert len(asked) >= len(ev.spans) and all(t < deadline for t in asked)
    # the trial running at the deadline finished instead of being cut, and the search ran
    # until the deadline, not shorter
    assert [r.state for r in first.results] == ["COMPLETE"] * len(asked)
    assert session[1] >= max(deadline, ev.spans[-1][1])  # the ledger covers the whole session

    # A rerun with the same budget finds it spent: nothing new is evaluated.
    again = _TimedEvaluator(sleep=0.3)
    second = run_search(
        _fast(trials=1000, pruner="none", timeout_min=budget_s / 60),
        out=out,
        evaluator=again,
        progress=False,
    )
    assert again.spans == [] and len(second.results) == len(first.results)

    # A larger budget resumes with only what is left of it (earlier sessions count).
    more = _TimedEvaluator(sleep=0.3)
    spent = RunDirectory(out).spent_s()
    assert spent >= budget_s
    third = run_search(
        _fast(trials=1000, pruner="none", timeout_min=(spent + 2.0) / 60),
        out=out,
        evaluator=more,
        progress=False,
    )
    start3 = max(s[0] for s in _sessions(out))
    asked3 = _asked_times(out)[len(asked) :]
    assert more.spans and asked3 and all(t < start3 + 2.0 for t in asked3)
    assert len(third.results) == len(asked) + len(asked3)


def test_timed_supernet_search_leaves_time_for_candidates(tmp_path):
    """Under --timeout-min the supernet's training takes its share of the budget, however many
    epochs were asked for, and candidates are evaluated in the rest (it used to train all its
    epochs first, past the deadline, and then evaluate nothing)."""
    out = tmp_path / "s"
    budget_s, share = 20.0, 0.25  # seconds: start-up on a loaded machine must fit well inside
    result = run_search(
        _fast(
            evaluator="supernet", supernet_epochs=100_000, supernet_budget_share=share,
            trials=1000, pruner="none", timeout_min=budget_s / 60, recal_batches=1,
        ),
        out=out,
        progress=False,
    )  # fmt: skip
    (session,) = _sessions(out)
    asked = _asked_times(out)
    # the first candidate is asked for once the supernet is trained: after its share of the
    # budget, well before the deadline (slack: data, one step past the budget, start-up)
    assert asked and session[0] + share * budget_s <= asked[0] < session[0] + budget_s
    assert any(r.state == "COMPLETE" for r in result.results)
    assert (out / "supernet.pt").is_file()
    with pytest.raises(ValueError, match="supernet_budget_share"):
        SearchRecipe(supernet_budget_share=1.0)


def test_supernet_search_repeats_itself_whatever_ran_before(tmp_path):
    """Same recipe and seed, same trials: the supernet's initial weights come from the seed,
    not from whatever the process drew before (``aanas search`` twice gave 92.0 % and 94.4 %)."""
    accuracies = []
    for run, before in enumerate((1, 2)):
        torch.manual_seed(before)  # another history of the process-wide generator
        result = run_search(
            _fast(evaluator="supernet", supernet_epochs=1, max_train_batches=4, recal_batches=1),
            out=tmp_path / f"s{run}",
            progress=False,
        )
        accuracies.append([(r.spec, r.accuracy) for r in result.results])
    assert accuracies[0] == accuracies[1]
    assert len(accuracies[0]) == 6


def test_spent_time_is_the_union_of_sessions(tmp_path):
    run_dir = RunDirectory(tmp_path).create()
    assert run_dir.spent_s() == 0.0
    run_dir.record_session("a", 0.0, 10.0)
    run_dir.record_session("b", 5.0, 20.0)  # a concurrent worker: overlap counted once
    run_dir.record_session("c", 30.0, 35.0)  # a later resumed run: added
    assert run_dir.spent_s() == 25.0
    run_dir.record_session("c", 30.0, 40.0)  # a session extends its own interval
    assert run_dir.spent_s() == 30.0 and run_dir.spent_s(exclude="c") == 20.0


def test_timeout_flag_and_bad_value(tmp_path, capsys):
    with pytest.raises(ValueError, match="timeout_min"):
        SearchRecipe(timeout_min=-1)
    code = main(["search", "--timeout-min", "abc", "--out", str(tmp_path / "x"), "--no-progress"])
    assert code == 2 and "timeout_min" in capsys.readouterr().err


def test_ray_engine_refuses_a_timeout_before_starting_ray(tmp_path):
    from aanas.errors import RecipeError

    with pytest.raises(RecipeError, match="timeout_min"):
        run_search(
            _fast(engine="ray", timeout_min=1.0),
            out=tmp_path / "ray",
            evaluator=SpecEvaluator(),
            progress=False,
        )


# --- warm start --------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_warm_start_architectures_are_evaluated_first(tmp_path, sampler):
    first = _specs_of_space(2)
    evaluator = SpecEvaluator()
    recipe = _fast(trials=5, sampler=sampler, warm_start=tuple(first))
    outcome = run_search(recipe, out=tmp_path / "s", evaluator=evaluator, progress=False)
    assert evaluator.seen[:2] == first
    assert [r.spec for r in sorted(outcome.results, key=lambda r: r.number)][:2] == first
    # resumed with more trials: the study exists, so nothing is enqueued (evaluated) again
    again = run_search(
        _fast(trials=7, sampler=sampler, warm_start=tuple(first)),
        out=tmp_path / "s",
        evaluator=evaluator,
        progress=False,
    )
    assert len(again.results) == 7 and evaluator.seen.count(first[0]) == 1


def test_warm_start_outside_the_space_fails_before_anything_runs(tmp_path):
    from aanas.errors import RecipeError

    out = tmp_path / "s"
    for entry, words in [
        ("resnet18", "not in this space"),
        ("mnasnet_a1_cifar_05", "unknown architecture"),
    ]:
        with pytest.raises(
            RecipeError, match=f"warm_start: '{entry}' cannot start tiny: .*{words}"
        ):
            run_search(_fast(warm_start=(entry,)), out=out, evaluator=SpecEvaluator())
    assert not out.exists()
