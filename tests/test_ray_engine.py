"""Ray Tune engine with the real ``train`` evaluator: ASHA on real accuracy, checkpoints, restore.

One search on the embedded digits (tiny space, 2 epochs of a few batches) is interrupted with
SIGINT (Ray's own graceful stop), raised by the driver's callback as soon as Ray has registered a
running trial's epoch-1 checkpoint, then run again: Tuner.restore resumes that trial from it.
Checked against Ray's own per-trial result files and against formulas written out here, not
against the engine's bookkeeping alone.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import ray.cloudpickle

from aanas.config import SearchRecipe
from aanas.results import TrialResult, read_jsonl
from aanas.search import ray_engine as ray_engine_module
from aanas.search import run_dir as run_dir_module
from aanas.search import run_search
from aanas.search.engine import SearchContext
from aanas.search.evaluators import build_objective
from aanas.search.ray_engine import RayEngine, _record, _trial_number, _worker_objective
from aanas.search.run_dir import RunDirectory
from aanas.search.scoring import Scorer
from aanas.space import SearchSpace
from aanas.supernet import SuperNet

REPO = Path(__file__).resolve().parent.parent


def _train_recipe(tmp_path: Path) -> str:
    """``digits_tiny`` with 2 BN-recalibration batches instead of 10 (test speed)."""
    text = (REPO / "recipes" / "digits_tiny.yaml").read_text()
    assert "bn_recalibrate_batches: 10" in text
    path = tmp_path / "digits_fast.yaml"
    path.write_text(text.replace("bn_recalibrate_batches: 10", "bn_recalibrate_batches: 2"))
    return str(path)


def test_worker_context_ships_no_driver_path(tmp_path: Path) -> None:
    """Workers get the space, supernet and latency table as objects, not head-node paths, and
    rebuild an objective that scores a candidate exactly as the driver's does."""
    space = SearchSpace.from_yaml("tiny")
    run_dir = RunDirectory(tmp_path / "run").create()
    SuperNet(space).save(run_dir.supernet_pt)
    recipe = SearchRecipe(engine="ray", evaluator="supernet", recal_batches=1, batch_size=32)
    scorer = Scorer.from_recipe(recipe, default_target_macs=3e6)
    ctx = SearchContext(space=space, recipe=recipe, scorer=scorer, run_dir=run_dir, study_name="s")
    shipped = ray.cloudpickle.dumps(RayEngine(ctx)._worker_context())
    assert str(tmp_path).encode() not in shipped
    assert b"supernet.pt" not in shipped

    worker_dir = tmp_path / "elsewhere"
    worker_dir.mkdir()
    kept = tmp_path / "kept.pt"  # for the driver-side reference objective below
    kept.write_bytes(run_dir.supernet_pt.read_bytes())
    run_dir.supernet_pt.unlink()  # a worker on another machine has no such file
    params = space.encode_params(space.sample(np.random.default_rng(1)))
    got = _worker_objective(ray.cloudpickle.loads(shipped), "cpu", worker_dir)(params, number=0)
    want = build_objective(recipe, space, scorer, supernet_path=kept)(params, number=0)
    assert got.state == want.state == "COMPLETE"
    assert got.spec == want.spec and got.accuracy == want.accuracy and got.macs == want.macs


def _fake_trial(status: str, record: TrialResult | None, number: int = 4) -> SimpleNamespace:
    last = {"aanas_result": json.dumps(record.to_dict())} if record is not None else {}
    return SimpleNamespace(
        trial_id="ab12cd34",
        path=f"/x/_trainable_ab12cd34_{number + 1}_stage1_depth=2_2026-12-02_11-00-00",
        status=status,
        last_result=last,
        error_file="/x/error.txt",
    )


def test_record_from_ray_trial_status() -> None:
    """Ray's trial status, not the shape of the last report, says what happened to a trial."""
    epoch1 = TrialResult(
        number=4, state="RUNNING", spec="s", macs=10, accuracy=0.5, metrics={"epochs": 1.0}
    )
    final = epoch1.replace(state="COMPLETE", accuracy=0.6, metrics={"epochs": 2.0})
    pruned = _record(_fake_trial("TERMINATED", epoch1))  # stopped between epochs by ASHA
    assert (pruned.number, pruned.state, pruned.accuracy, pruned.macs) == (4, "PRUNED", 0.5, 10)
    assert "after epoch 1" in pruned.note
    assert _record(_fake_trial("RUNNING", epoch1)).state == "RUNNING"  # interrupted: resumes
    assert _record(_fake_trial("PENDING", None)).state == "RUNNING"
    assert _record(_fake_trial("TERMINATED", final)) == final
    lost = _record(_fake_trial("ERROR", epoch1))  # its worker died mid-way, retries exhausted
    assert lost.state == "FAIL" and "error.txt" in lost.error and lost.accuracy == 0.5
    assert _record(_fake_trial("ERROR", None)).state == "FAIL"
    # a callback sees the trial before Ray updates its status
    assert _record(_fake_trial("RUNNING", epoch1), "TERMINATED").state == "PRUNED"


def test_restored_experiment_gets_the_live_callback(tmp_path: Path) -> None:
    """Ray pickles callbacks into the experiment; unpickled in a resuming driver, ours comes
    back as that driver's live callback, elsewhere as an inert one."""
    space = SearchSpace.from_yaml("tiny")
    recipe = SearchRecipe(engine="ray", evaluator="train")
    ctx = SearchContext(
        space=space,
        recipe=recipe,
        scorer=Scorer.from_recipe(recipe, default_target_macs=3e6),
        run_dir=RunDirectory(tmp_path / "run").create(),
        study_name="s",
    )
    engine = RayEngine(ctx)
    live = engine._callback()
    blob = ray.cloudpickle.dumps([live])
    assert ray.cloudpickle.loads(blob)[0] is live
    ray_engine_module._LIVE_CALLBACKS.pop(engine.experiment_dir)
    inert = ray.cloudpickle.loads(blob)[0]
    assert inert is not live and type(inert).__name__ == "Callback"


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _ray_reports(trial_dir: Path) -> list[dict]:
    """Every result a Ray trial reported, from Ray's own ``result.json`` (one JSON a line)."""
    path = trial_dir / "result.json"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.strip()]


@pytest.mark.slow
def test_train_evaluator_asha_checkpoints_and_restore(tmp_path, ray_local, monkeypatch):
    out = tmp_path / "run"
    recipe = SearchRecipe(
        engine="ray",
        evaluator="train",
        train_recipe=_train_recipe(tmp_path),
        train_epochs=2,
        max_train_batches=3,
        batch_size=32,
        trials=8,
        seed=0,
        cpus_per_trial=1,
    )
    # --- first run: interrupted right after a trial's epoch-1 checkpoint is registered ------
    # Ray Tune's own Ctrl-C path (its SIGINT handler ends the run after the current controller
    # step and saves the experiment), raised from the driver's callback at the moment the
    # checkpoint of a trial that ASHA let continue has been processed: the trial's next
    # result cannot be processed before the run ends, so the interruption lands mid-trial in
    # every run (no race with the trial's own speed).
    interrupted: list[int] = []
    live_callback = RayEngine._callback

    def interrupting_callback(engine: RayEngine) -> object:
        live = live_callback(engine)
        on_trial_save = live.on_trial_save

        def save_then_interrupt(**info: object) -> None:
            on_trial_save(**info)
            trial = info["trial"]
            last = trial.last_result or {}
            record = json.loads(last.get("aanas_result", "{}"))
            epochs = record.get("metrics", {}).get("epochs")
            # done: ASHA stopped it on this result, so it has nothing left to resume
            if not interrupted and record.get("state") == "RUNNING" and epochs == 1.0:
                if not last.get("done"):
                    interrupted.append(_trial_number(trial.trial_id, Path(trial.path).name))
                    signal.raise_signal(signal.SIGINT)

        live.on_trial_save = save_then_interrupt  # instance attribute: pickling is unchanged
        return live

    with monkeypatch.context() as patch:
        patch.setattr(RayEngine, "_callback", interrupting_callback)
        first = run_search(recipe, out=out, progress=False)
    assert len(interrupted) == 1, "no trial reached a checkpointed epoch-1 report"
    resumed = interrupted[0]
    unfinished = {r.number for r in first.results if r.state == "RUNNING"}
    assert resumed in unfinished, first.results
    exp_dir = out / "ray" / "run"
    resumed_dir = next(exp_dir.glob(f"*_{resumed + 1}_*"))
    assert (resumed_dir / "checkpoint_000000").is_dir()
    before = _ray_reports(resumed_dir)  # its reports so far: epoch 1 only
    assert [json.loads(r["aanas_result"])["metrics"]["epochs"] for r in before] == [1.0]

    # --- second run: Tuner.restore; the run directory is updated trial by trial ----------------
    added: list[int] = []
    original_add = run_dir_module.TrialLog.add

    def spy_add(self, record):
        added.append(record.number)
        return original_add(self, record)

    monkeypatch.setattr(run_dir_module.TrialLog, "add", spy_add)
    second = run_search(recipe, out=out, progress=False)
    results = {r.number: r for r in second.results}
    assert sorted(results) == list(range(8))
    assert unfinished <= set(added)  # the restored callback handed each resumed trial over

    # every trial carries its spec, its cost and a real accuracy; none RUNNING, none FAIL
    states = {r.state for r in results.values()}
    assert states <= {"COMPLETE", "PRUNED"} and "COMPLETE" in states, states
    for r in results.values():
        assert r.spec and r.macs and r.accuracy is not None and r.worker, r
    meta = json.loads((out / "run.json").read_text())
    target = float(meta["target"])
    for r in results.values():
        trial_dir = next(exp_dir.glob(f"*_{r.number + 1}_*"))
        reports = _ray_reports(trial_dir)
        record = json.loads(reports[-1]["aanas_result"])
        # the score Ray (ASHA, OptunaSearch) saw is the soft MnasNet reward of the real accuracy
        # and cost (arXiv:1807.11626 Eq. 2, w = -0.07), at every report, not 0
        for rep in reports:
            acc = json.loads(rep["aanas_result"])["accuracy"]
            assert rep["score"] == pytest.approx(acc * (r.macs / target) ** -0.07)
        if r.state == "COMPLETE":
            # the last epoch's report IS the final record: 2 reports for 2 epochs
            assert len(reports) == 2 and record["state"] == "COMPLETE"
            assert r.metrics["epochs"] == 2 and r.reward == pytest.approx(reports[-1]["score"])
        else:  # stopped by ASHA at its first rung, with that epoch's real accuracy
            assert len(reports) == 1 and record["state"] == "RUNNING"
            assert r.metrics["epochs"] == 1 and "ASHA" in r.note
            assert r.accuracy == pytest.approx(record["accuracy"])
    assert any(r.accuracy > 0.2 for r in results.values())  # real learning: 10 classes

    # the interrupted trial continued from its epoch-1 checkpoint, not from scratch: its first
    # report after the restore is epoch 2 (no second epoch-1 report) and says so
    after = _ray_reports(resumed_dir)[len(before) :]
    assert after, "the interrupted trial reported nothing after the restore"
    first_after = json.loads(after[0]["aanas_result"])
    assert first_after["metrics"]["epochs"] >= 2, first_after
    assert first_after["metrics"].get("resumed_at_epoch") == 1.0, first_after
    assert all(json.loads(r["aanas_result"])["metrics"]["epochs"] >= 2 for r in after)
    assert results[resumed].state == "COMPLETE", results[resumed]
    assert results[resumed].metrics.get("resumed_at_epoch") == 1.0, results[resumed]

    # the Pareto front (min MACs, max accuracy) over the COMPLETE trials, by brute force
    complete = [r for r in results.values() if r.state == "COMPLETE"]
    naive = {
        r.number
        for r in complete
        if not any(
            (o.macs <= r.macs and o.accuracy >= r.accuracy)
            and (o.macs < r.macs or o.accuracy > r.accuracy or o.number < r.number)
            for o in complete
        )
    }  # of equal points the lowest trial number stays
    front = json.loads((out / "pareto.json").read_text())["front"]
    assert {p["number"] for p in front} == naive
    # trials.jsonl agrees with the engine's records; the best COMPLETE trial's weights came back
    rows = {r.number: r.state for r in read_jsonl(out / "trials.jsonl")}
    assert rows == {n: r.state for n, r in results.items()}
    assert (out / "best" / "model.pt").is_file()
