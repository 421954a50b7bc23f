"""aanas.results: TrialResult records, JSONL/CSV round trips, Pareto fronts, hypervolume."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest

from aanas.results import (
    TrialResult,
    append_csv,
    append_jsonl,
    dominates,
    hypervolume_2d,
    pareto,
    pareto_indices,
    read_csv,
    read_jsonl,
    results_hypervolume,
    write_csv,
    write_jsonl,
)


def _record(
    number: int, acc: float | None, macs: int | None, state: str = "COMPLETE"
) -> TrialResult:
    return TrialResult(number=number, state=state, spec=f"s{number}", accuracy=acc, macs=macs)


def test_round_trip_jsonl_and_csv(tmp_path):
    records = [
        TrialResult(
            number=0,
            state="COMPLETE",
            spec="mnasnet:x",
            params={"stage1.depth": 2, "stage2.aa.placement": "last"},
            accuracy=0.91,
            reward=0.87,
            macs=5_000_000,
            n_params=120_000,
            latency_ms=1.25,
            wall_s=3.5,
            seed=7,
            metrics={"val_loss": 0.3},
        ),
        TrialResult(number=1, state="FAIL", error="NonFiniteLossError: nan", params={"a": 1}),
        TrialResult(number=2, state="REJECTED", note="over budget", macs=9_000_000),
    ]
    write_jsonl(tmp_path / "t.jsonl", records)
    write_csv(tmp_path / "t.csv", records)
    assert read_jsonl(tmp_path / "t.jsonl") == records
    assert read_csv(tmp_path / "t.csv") == records
    # every line is one JSON object with the canonical spec string
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["spec"] == "mnasnet:x"


def test_nan_is_stored_as_null(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [TrialResult(number=0, state="FAIL", accuracy=math.nan)])
    assert read_jsonl(tmp_path / "t.jsonl")[0].accuracy is None


def test_bad_records_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="state"):
        TrialResult(number=0, state="DONE")
    (tmp_path / "t.jsonl").write_text('{"number": 0, "state": "COMPLETE", "colour": 1}\n')
    with pytest.raises(ValueError, match="t.jsonl:1.*colour"):
        read_jsonl(tmp_path / "t.jsonl")


def test_atomic_write_leaves_no_temp_files(tmp_path):
    for i in range(3):
        write_jsonl(tmp_path / "t.jsonl", [_record(i, 0.5, 10)])
    assert [p.name for p in tmp_path.iterdir()] == ["t.jsonl"]


def _brute_front(points):
    return [
        i
        for i, p in enumerate(points)
        if not any(
            all(q[k] <= p[k] for k in range(len(p))) and any(q[k] < p[k] for k in range(len(p)))
            for q in points
        )
    ]


@pytest.mark.parametrize("seed", range(5))
def test_pareto_indices_match_brute_force(seed):
    rng = random.Random(seed)
    pts = [(rng.randint(0, 6), rng.randint(0, 6), rng.randint(0, 3)) for _ in range(25)]
    assert pareto_indices(pts) == _brute_front(pts)


def test_dominates():
    assert dominates((1, 1), (1, 2))
    assert not dominates((1, 2), (1, 2))
    assert not dominates((0, 3), (1, 2))


def test_pareto_of_records():
    rs = [
        _record(0, 0.80, 10),
        _record(1, 0.85, 20),
        _record(2, 0.70, 30),  # dominated by 0 and 1
        _record(3, 0.90, 40),
        _record(4, 0.99, 5, state="FAIL"),  # not COMPLETE: ignored
        _record(5, 0.80, 10),  # same point as 0: listed once (lowest number)
        _record(6, None, 1),  # no accuracy: ignored
    ]
    assert [r.number for r in pareto(rs)] == [0, 1, 3]


def _grid_area(points, ref, steps=400):
    """Monte-Carlo-free brute force: count dominated cells of a fine grid."""
    lo_x = min(min(p[0] for p in points), ref[0])
    lo_y = min(min(p[1] for p in points), ref[1])
    dx = (ref[0] - lo_x) / steps
    dy = (ref[1] - lo_y) / steps
    covered = 0
    for i, j in itertools.product(range(steps), range(steps)):
        cx, cy = lo_x + (i + 0.5) * dx, lo_y + (j + 0.5) * dy
        if any(p[0] <= cx and p[1] <= cy for p in points):
            covered += 1
    return covered * dx * dy


def test_hypervolume_worked_example():
    assert hypervolume_2d([(1, 3), (2, 1)], (4, 4)) == pytest.approx(7.0)
    assert hypervolume_2d([], (4, 4)) == 0.0
    assert hypervolume_2d([(5, 1)], (4, 4)) == 0.0  # beyond the reference


@pytest.mark.parametrize("seed", range(3))
def test_hypervolume_matches_brute_force(seed):
    rng = random.Random(seed)
    pts = [(rng.uniform(0, 10), rng.uniform(0, 10)) for _ in range(8)]
    ref = (10.0, 10.0)
    assert hypervolume_2d(pts, ref) == pytest.approx(_grid_area(pts, ref), rel=0.02)


def test_results_hypervolume_uses_accuracy_up_cost_down():
    rs = [_record(0, 0.5, 2), _record(1, 0.75, 4), _record(2, 0.9, 8, state="PRUNED")]
    # minimise (macs, -acc) against reference (macs 8, acc 0): 6 * 0.5 + 4 * 0.25 = 4.0
    assert results_hypervolume(rs, ref_cost=8) == pytest.approx(4.0)
    assert results_hypervolume(rs, ref_cost=8, cost_scale=8) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(5))
def test_pareto_indices_2d_sweep_matches_brute_force_with_ties(seed):
    """The O(n log n) 2-D sweep against the O(n^2) definition, on a small grid full of ties
    (equal x, equal y, duplicated points)."""
    rng = random.Random(seed)
    pts = [(rng.randint(0, 8), rng.randint(0, 8)) for _ in range(60)]
    assert pareto_indices(pts) == _brute_front(pts)
    floats = [(rng.uniform(0, 1), rng.uniform(0, 1)) for _ in range(300)]
    assert pareto_indices(floats) == _brute_front(floats)


def test_append_then_read_keeps_order_and_skips_a_cut_last_line(tmp_path):
    path = tmp_path / "t.jsonl"
    records = [_record(i, 0.5 + i / 100, 10 + i) for i in range(3)]
    for r in records:
        append_jsonl(path, [r])
        append_csv(tmp_path / "t.csv", [r])
    assert read_jsonl(path) == records
    assert read_csv(tmp_path / "t.csv") == records  # one header, then the rows
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"number": 3, "state": "COMP')  # a kill during an append
    with pytest.raises(ValueError, match="t.jsonl:4"):
        read_jsonl(path)
    assert read_jsonl(path, tolerate_partial_tail=True) == records


def test_judged_cost_prefers_measured_then_predicted_latency():
    r = TrialResult(number=0, state="COMPLETE", macs=5, latency_pred_ms=2.0)
    assert r.judged_cost("latency_ms") == 2.0 and r.judged_cost("macs") == 5.0
    assert r.replace(latency_ms=1.5).judged_cost("latency_ms") == 1.5
    assert r.replace(latency_pred_ms=None).judged_cost("latency_ms") is None
    # the front over latency uses the prediction when nothing was measured
    rs = [
        TrialResult(number=0, state="COMPLETE", accuracy=0.8, latency_pred_ms=2.0),
        TrialResult(number=1, state="COMPLETE", accuracy=0.7, latency_pred_ms=3.0),
    ]
    assert [x.number for x in pareto(rs, "latency_ms")] == [0]


@pytest.mark.parametrize("seed", range(3))
def test_trial_log_incremental_front_equals_the_batch_front(tmp_path, seed):
    from aanas.search.run_dir import RunDirectory, TrialLog

    rng = random.Random(seed)
    log = TrialLog(RunDirectory(tmp_path).create(), cost="macs")
    records = []
    for i in range(120):
        state = rng.choice(["COMPLETE"] * 4 + ["FAIL", "PRUNED"])
        r = _record(i, rng.randint(50, 60) / 100, rng.randint(1, 12), state=state)
        records.append(r)
        log.add(r)
        assert sorted(f.number for f in log.front) == sorted(x.number for x in pareto(records))
    assert read_jsonl(tmp_path / "trials.jsonl") == records
    saved = json.loads((tmp_path / "pareto.json").read_text())
    assert [p["number"] for p in saved["front"]] == [x.number for x in pareto(records)]
    assert saved["reference"]["macs"] == pytest.approx(
        1.1 * max(r.macs for r in records if r.state == "COMPLETE")
    )
