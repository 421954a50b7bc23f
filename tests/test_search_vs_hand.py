"""benchmarks/search_vs_hand.py end to end on tiny budgets: phases resume, the MACs budget holds,
the report has every row.

Runs on the embedded digits data and the tiny space (the CIFAR subset's 10k validation images
would make every search trial cost seconds of evaluation): the pipeline is the same.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from aanas.config import load_recipe
from aanas.cost import count_module
from aanas.models import create_model
from aanas.spec import decode

REPO = Path(__file__).resolve().parents[1]


def _load(name: str) -> Any:
    path = REPO / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# seconds-long searches; final training of 2 steps of batch 32, one seed
_ARGS = [
    "--tiny",
    "--data", "digits",
    "--space", "tiny",
    "--budget-min", "0.08",
    "--search-batches", "2",
    "--set", "batch_size=32",
    "--set", "max_train_batches=2",
    "--latency-repeats", "3",
    "--threads", "1",
]  # fmt: skip


def test_search_vs_hand_tiny_resumes_and_respects_the_budget(tmp_path: Path) -> None:
    bench = _load("search_vs_hand")
    out = tmp_path / "svh"
    # One phase at a time (a session too short for all): one search, nothing trained.
    only = bench.main([*_ARGS, "--out", str(out), "--searches", "train", "--searches-only"])
    assert only["searches_ran"] == 1 and list(only["searches"]) == ["train"]
    assert not (out / "runs").exists() and not (out / "report.md").exists()
    first = bench.main([*_ARGS, "--out", str(out)])
    assert first["searches_ran"] == 2  # the train search is read back
    assert first["searches"]["train"] == only["searches"]["train"]
    assert all(f"{os.cpu_count()} cores" in s["host"] for s in first["searches"].values())
    hand = ["plain_cnn", *(load_recipe(r).model for r in bench.HAND_RECIPES)]
    found = [f"found:{n}" for n in bench.SEARCHES if first["searches"][n]["best"] is not None]
    # a search whose budget went on start-up (imports, data, the supernet) finds nothing and
    # has no row; on seconds-long budgets that can happen, but not to all three
    assert found
    rows = {r["model"]: r for r in first["table"]}
    assert list(rows) == [*hand, *found]  # every row, hand baselines first
    # one seed each; two searches that found the same architecture share its training
    assert first["trained"] == len({r["spec"] or r["model"] for r in rows.values()})

    # The budget is the smallest hand baseline's MACs, counted independently here (hooks on
    # the built modules, not the analytical model the search used), and every found model
    # stays within it.
    budget = first["budget_macs"]
    hand_macs = [count_module(bench.PlainCNN(10), 32).macs] + [
        count_module(create_model(m, num_classes=10, input_size=32), 32).macs for m in hand[1:]
    ]
    assert budget == min(hand_macs)
    for name in found:
        spec = decode(rows[name]["spec"])
        assert count_module(create_model(spec), 32).macs <= budget
        assert first["goal"][name.split(":")[1]]["holds"] == (
            all(rows[name]["test_top1_mean"] >= rows[h]["test_top1_mean"] for h in hand)
        )
    for search in first["searches"].values():  # no trial above the budget was trained
        for line in (Path(search["run_dir"]) / "trials.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec["state"] in ("COMPLETE", "PRUNED"):
                assert rec["macs"] <= budget

    report = (out / "report.md").read_text()
    assert all(f"| {name} |" in report for name in rows)
    assert (out / "pareto.png").stat().st_size > 10_000
    assert json.loads((out / "summary.json").read_text())["table"] == first["table"]

    # A rerun resumes: nothing is searched or trained again, and the figures are identical.
    second = bench.main([*_ARGS, "--out", str(out)])
    assert second["searches_ran"] == 0 and second["trained"] == 0
    assert second["table"] == first["table"]

    # A run killed mid-way: one search unfinished, one training missing. Only those run.
    state = json.loads((out / "state.json").read_text())
    del state["searches"]["random"]
    (out / "state.json").write_text(json.dumps(state))
    (out / "runs" / "plain_cnn" / "seed0.json").unlink()
    third = bench.main([*_ARGS, "--out", str(out)])
    assert third["searches_ran"] == 1 and third["trained"] == 1
    # the resumed search counted its spent time: no new trial, the same best
    assert third["searches"]["random"]["best"] == first["searches"]["random"]["best"]

    # Another results folder reads these runs (same recipe, spec, seed) instead of training:
    # how the benchmark reuses `aanas reproduce mobile --out`'s runs of the MnasNet baselines.
    other = tmp_path / "other"
    fourth = bench.main(
        [*_ARGS, "--out", str(other), "--searches", "train", "--reuse-runs", str(out)]
    )
    assert fourth["trained"] <= 1  # at most the train search's best, if it found another one
    rows4 = {r["model"]: r for r in fourth["table"]}
    for name in hand:
        record = json.loads((other / "runs" / name / "seed0.json").read_text())
        assert record["reused_from"].startswith(str(out / "runs"))
        assert rows4[name]["test_top1"] == rows[name]["test_top1"]


def test_bad_arguments_fail_before_any_work(tmp_path: Path) -> None:
    bench = _load("search_vs_hand")
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--data", "digits", "--searches", "train,evolution"])
    assert exc.value.code == 2
    with pytest.raises(ValueError, match="epochs"):
        bench.main(["--tiny", "--data", "digits", "--set", "epochs=x", "--out", str(tmp_path)])
    assert not (tmp_path / "state.json").exists()


def test_warm_start_reaches_the_train_search_only() -> None:
    bench = _load("search_vs_hand")
    args = bench.parse_args(["--data", "digits", "--warm-start", "mnasnet_a1_cifar_050, x"])
    assert args.warm_start == ["mnasnet_a1_cifar_050", "x"]
    assert bench._search_recipe("train", args, 30_000_000).warm_start == (
        "mnasnet_a1_cifar_050",
        "x",
    )
    assert bench._search_recipe("random", args, 30_000_000).warm_start == ()
    assert bench._search_recipe("supernet", args, 30_000_000).warm_start == ()
