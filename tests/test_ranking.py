"""Tests for aanas.search.ranking: rank correlations and bootstrap against naive references."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from aanas.config import TrainRecipe
from aanas.cost import count_spec
from aanas.search.ranking import (
    RankingReport,
    bootstrap_interval,
    kendall_tau,
    near_cost_agreement,
    ranking_report,
    spearman_rho,
    stratified_by_macs,
    top_k_contains_best,
)
from aanas.space import SearchSpace
from aanas.spec import decode


def _naive_tau_b(x: list[float], y: list[float]) -> float:
    """O(n^2) tau-b: (C - D) / sqrt((n0 - n1)(n0 - n2)) over all pairs."""
    n = len(x)
    conc = disc = tie_x = tie_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            if dx == 0:
                tie_x += 1
            if dy == 0:
                tie_y += 1
            if dx * dy > 0:
                conc += 1
            elif dx * dy < 0:
                disc += 1
    n0 = n * (n - 1) // 2
    return (conc - disc) / math.sqrt((n0 - tie_x) * (n0 - tie_y))


def _naive_rank(v: list[float]) -> list[float]:
    """1-based ranks, ties get the mean of the ranks they span."""
    return [1 + sum(1 for w in v if w < a) + (sum(1 for w in v if w == a) - 1) / 2 for a in v]


def _naive_rho(x: list[float], y: list[float]) -> float:
    rx, ry = np.array(_naive_rank(x)), np.array(_naive_rank(y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / math.sqrt((rx**2).sum() * (ry**2).sum()))


@pytest.mark.parametrize("seed", range(8))
def test_correlations_match_naive_references(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 25))
    x = rng.integers(0, 8, n).astype(float).tolist()  # ties on purpose
    y = (np.array(x) * rng.choice([-1, 0.5, 1]) + rng.integers(0, 6, n)).tolist()
    assert kendall_tau(x, y) == pytest.approx(_naive_tau_b(x, y), abs=1e-12)
    assert spearman_rho(x, y) == pytest.approx(_naive_rho(x, y), abs=1e-12)


def test_degenerate_inputs() -> None:
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman_rho([1, 2, 3], [5, 5, 5]))
    assert math.isnan(kendall_tau([1], [2]))
    with pytest.raises(ValueError, match="equally long"):
        kendall_tau([1, 2], [1, 2, 3])
    assert bootstrap_interval([1, 2, 3, 4], [2, 4, 6, 8], kendall_tau, n_resamples=200) == (
        1.0,
        1.0,
    )


def test_bootstrap_matches_scipy_percentile() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=15)
    y = x + rng.normal(scale=0.8, size=15)
    ours = bootstrap_interval(x.tolist(), y.tolist(), spearman_rho, n_resamples=1500, seed=1)
    ref = stats.bootstrap(
        (x, y),
        lambda a, b: stats.spearmanr(a, b).statistic,
        paired=True,
        vectorized=False,
        n_resamples=1500,
        method="percentile",
        rng=np.random.default_rng(2),
    ).confidence_interval
    assert ours[0] == pytest.approx(ref.low, abs=0.06)
    assert ours[1] == pytest.approx(ref.high, abs=0.06)
    assert ours[0] < spearman_rho(x.tolist(), y.tolist()) < ours[1]
    # a higher level gives a wider interval from the same resamples
    wide = bootstrap_interval(
        x.tolist(), y.tolist(), spearman_rho, n_resamples=1500, seed=1, level=0.99
    )
    assert wide[0] <= ours[0] and wide[1] >= ours[1]


def test_top_k_and_report() -> None:
    assert not top_k_contains_best([0.9, 0.5, 0.7], [0.6, 0.8, 0.7], k=2)
    assert top_k_contains_best([0.9, 0.5, 0.7], [0.6, 0.8, 0.7], k=3)
    assert top_k_contains_best([0.9, 0.5, 0.5], [0.6, 0.8, 0.7], k=2)  # tie at the cut
    truth = list(range(20))
    report = ranking_report([t + (3 if t % 4 == 0 else 0) for t in truth], truth, n_resamples=300)
    assert report.n == 20 and report.top_k_contains_best
    assert report.kendall_tau == pytest.approx(
        _naive_tau_b([t + (3 if t % 4 == 0 else 0) for t in truth], truth)
    )
    lo, hi = report.kendall_tau_ci
    assert lo <= report.kendall_tau <= hi <= 1.0
    assert report.to_dict()["spearman_rho_ci"] == list(report.spearman_rho_ci)
    assert RankingReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


@pytest.mark.parametrize("seed", range(5))
def test_near_cost_agreement_matches_a_pair_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 15
    costs = np.exp(rng.uniform(0, 3, n))
    truth = np.round(rng.normal(size=n), 1)  # rounded: some ties, which are left out
    predicted = np.round(truth + rng.normal(scale=1.0, size=n), 1)
    agree = pairs = 0
    for i in range(n):
        for j in range(i + 1, n):
            if max(costs[i], costs[j]) > 1.5 * min(costs[i], costs[j]):
                continue
            dp, dt = predicted[i] - predicted[j], truth[i] - truth[j]
            if dp == 0 or dt == 0:
                continue
            pairs += 1
            agree += (dp > 0) == (dt > 0)
    share, counted = near_cost_agreement(predicted, truth, costs, 1.5)
    assert counted == pairs > 0 and share == pytest.approx(agree / pairs)


def test_near_cost_agreement_edges() -> None:
    assert near_cost_agreement([1, 2, 3], [1, 2, 3], [1, 1.2, 10]) == (1.0, 1)
    assert near_cost_agreement([2, 1, 3], [1, 2, 3], [1, 1.2, 10]) == (0.0, 1)
    share, pairs = near_cost_agreement([1, 2], [1, 2], [1, 10])
    assert math.isnan(share) and pairs == 0
    with pytest.raises(ValueError, match="costs > 0"):
        near_cost_agreement([1, 2], [1, 2], [0, 1])
    with pytest.raises(ValueError, match="equally long"):
        near_cost_agreement([1, 2], [1, 2], [1])


def test_stratified_by_macs_spans_the_range() -> None:
    space = SearchSpace.from_yaml("tiny")
    n = 8
    specs = stratified_by_macs(space, n, np.random.default_rng(0))
    assert len(set(specs)) == n
    for s in specs:
        space.encode_params(s)  # raises if not in the space
    macs = [count_spec(s).macs for s in specs]
    assert macs == sorted(macs)
    lo, hi = count_spec(space.smallest()).macs, count_spec(space.largest()).macs
    step = (hi / lo) ** (1 / n)
    # the cheapest and dearest strata are both represented
    assert macs[0] <= lo * step and macs[-1] >= hi / step
    # a uniform sample of the same size crowds the middle: its spread is smaller
    rng = np.random.default_rng(0)
    uniform = [count_spec(space.sample(rng)).macs for _ in range(n)]
    assert np.std(np.log(macs)) > np.std(np.log(uniform))
    assert stratified_by_macs(space, n, np.random.default_rng(0)) == specs  # seeded
    with pytest.raises(ValueError, match="fewer than"):
        stratified_by_macs(space, space.size() + 1, np.random.default_rng(0))


def _load_benchmark() -> Any:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "supernet_ranking.py"
    spec = importlib.util.spec_from_file_location("supernet_ranking_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_benchmark_cache_trains_only_what_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = _load_benchmark()
    trained: list[str] = []

    def fake_fit(model: Any, data: Any, recipe: TrainRecipe, **kw: Any) -> dict[str, float]:
        trained.append(model.spec.encode())  # training itself is not what this test checks
        assert kw["evaluate_test"]
        return {"test_top1": 0.5 + 0.01 * len(trained), "val_top1": 0.4}

    monkeypatch.setattr(bench, "fit", fake_fit)
    space = SearchSpace.from_yaml("tiny")
    specs = stratified_by_macs(space, 3, np.random.default_rng(0))
    recipe = TrainRecipe(epochs=1)
    runs = tmp_path / "c" / "runs"
    first = bench.standalone_results(specs, None, recipe, runs, "cpu")
    assert len(trained) == 3 and [r["spec"] for r in first] == [s.encode() for s in specs]
    records = sorted(p.relative_to(runs).as_posix() for p in runs.rglob("*") if p.is_file())
    assert records == sorted(f"{s.digest()}/seed0.json" for s in specs)  # no temp files
    # a rerun reads everything back; one new architecture and a changed recipe train again
    extra = next(
        s for s in (space.sample(np.random.default_rng(i)) for i in range(50)) if s not in specs
    )
    again = bench.standalone_results([*specs, extra], None, recipe, runs, "cpu")
    assert len(trained) == 4 and trained[-1] == extra.encode()
    assert [r["test_top1"] for r in again[:3]] == [r["test_top1"] for r in first]
    bench.standalone_results(specs[:1], None, TrainRecipe(epochs=2), runs, "cpu")
    assert len(trained) == 5  # another recipe: trained again, its record replaces the old one

    # A run killed mid-way continues from the checkpoint fit left in its partial folder.
    def killed_fit(model: Any, data: Any, recipe: TrainRecipe, **kw: Any) -> dict[str, float]:
        assert kw["resume"] is None
        (Path(kw["out_dir"]) / "last.pt").write_bytes(b"after epoch 1")
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "fit", killed_fit)
    with pytest.raises(KeyboardInterrupt):
        bench.standalone_results([extra], None, TrainRecipe(epochs=3), runs, "cpu")
    resumed_from: list[Any] = []

    def resuming_fit(model: Any, data: Any, recipe: TrainRecipe, **kw: Any) -> dict[str, float]:
        resumed_from.append(kw["resume"])
        return {"test_top1": 0.7, "val_top1": 0.6}

    monkeypatch.setattr(bench, "fit", resuming_fit)
    bench.standalone_results([extra], None, TrainRecipe(epochs=3), runs, "cpu")
    partial = runs / extra.digest() / "seed0.partial"
    assert resumed_from == [partial / "last.pt"] and not partial.exists()
    monkeypatch.setattr(bench, "fit", fake_fit)
    # Another benchmark's folder reuses these runs (same recipe, spec, seed): nothing trains.
    other = bench.standalone_results(specs[1:], None, recipe, tmp_path / "d", "cpu", reuse=[runs])
    assert len(trained) == 5
    assert [r["test_top1"] for r in other] == [r["test_top1"] for r in first[1:]]


@pytest.mark.slow
def test_benchmark_end_to_end_on_digits(tmp_path: Path) -> None:
    """The whole script on the embedded digits (tiny budgets): ground truth, short-training
    ranking and a supernet, then summary.json; a rerun reads everything back."""
    bench = _load_benchmark()
    out = tmp_path / "r"
    argv = ["--tiny", "--proxy", "--data", "digits", "--out", str(out), "--archs", "4",
            "--supernet-set", "epochs=1", "--supernet-set", "max_batches=2"]  # fmt: skip
    # the supernet trains on its own first (no ground truth needed), as a parallel process would
    assert bench.main([*argv, "--variant", "+shrink", "--supernets-only"]) == 0
    (trained,) = out.glob("supernet-*.pt")
    supernet_mtime = trained.stat().st_mtime_ns
    assert not (out / "runs").exists()
    # two shards share the ground truth and short trainings (as two processes or machines
    # would), then stop
    for shard in ("0/2", "1/2"):
        assert bench.main([*argv, "--shard", shard]) == 0
    truth = sorted(p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json"))
    assert len(truth) == 4 and not (out / "summary.json").exists()
    assert len(list((out / "proxy_runs").rglob("*.json"))) == 4
    assert bench.main([*argv, "--variant", "+shrink"]) == 0
    assert sorted(p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")) == truth
    assert trained.stat().st_mtime_ns == supernet_mtime  # read back, not trained again
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["standalone"]) == 4 == len(summary["short_training"]["val_top1"])
    (variant,) = summary["variants"].values()
    assert variant["report"]["n"] == 4 and len(variant["inherited"]) == 4
    # the zero-cost baseline ranks by each architecture's MACs (nan when the tiny training
    # leaves every accuracy equal, as scipy says too)
    macs = [r["macs"] for r in summary["standalone"]]
    assert macs == [count_spec(decode(s)).macs for s in summary["archs"]]
    top1 = [r["test_top1"] for r in summary["standalone"]]
    expected = stats.kendalltau(macs, top1).statistic
    assert summary["macs_baseline"]["kendall_tau"] == pytest.approx(expected, nan_ok=True)
    argv = [*argv, "--variant", "+shrink"]
    assert not list(out.glob("*.progress.pt"))  # the supernet finished: no training state left
    files = sorted(p.name for p in out.rglob("*.json"))
    assert bench.main(argv) == 0  # nothing new trains or is written besides the summary
    assert sorted(p.name for p in out.rglob("*.json")) == files


def test_benchmark_arguments_fail_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load_benchmark()
    for argv, expected in (
        (["--shard", "2/2"], "--shard must look like K/N with 0 <= K < N, got '2/2'"),
        (["--supernets-only", "--shard", "0/2"], "exclude each other"),
        (["--variant", "sandwich+"], "invalid choice: 'sandwich+'"),
    ):
        with pytest.raises(SystemExit):
            bench.parse_args(["--data", "digits", *argv])
        assert expected in capsys.readouterr().err
    args = bench.parse_args(["--data", "digits", "--variant", "uniform", "--variant", "+shrink"])
    assert args.ablation and args.variant == ["uniform", "+shrink"]
