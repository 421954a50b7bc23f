"""Engine overhead per candidate: Optuna (in-memory, SQLite) vs Ray Tune, evaluation excluded.

Every configuration searches the ``tiny`` space with a trivial evaluator (a fixed accuracy,
returned instantly), so the time is the engine's own: suggesting params, decoding, the
analytical cost, storage, callbacks and, for :func:`aanas.search.run_search`, rewriting the run
directory after every trial.

- ``optuna-mem``: :class:`~aanas.search.optuna_engine.OptunaEngine` on an in-memory study
  (``engine.study`` set before ``run()``; ``run_search`` itself always opens an RDB storage);
- ``optuna-sqlite``: the same engine on ``sqlite:///<tmp>/study.db`` (heartbeats on);
- ``run_search optuna``: the full ``aanas search`` path (SQLite + run-directory files per trial);
- ``run_search ray optuna-tpe`` / ``ray random``: ``--engine ray`` with OptunaSearch(TPE) and
  Ray's own random search, local Ray. ``ray.init`` is timed separately (done before the search,
  so the engine finds Ray initialised), and each Ray search runs twice (N1 and N2 trials), so
  the marginal cost per trial ``(t(N2) - t(N1)) / (N2 - N1)`` is apart from the fixed Tuner
  setup.

Ratios are measured in one run (the machine is shared and noisy):

    python benchmarks/engine_overhead.py                 # 50 Optuna trials, 10/25 Ray trials
    python benchmarks/engine_overhead.py --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from aanas.search import Evaluation, Objective, SearchRecipe, run_search
from aanas.search.optuna_engine import OptunaEngine
from aanas.space import SearchSpace


@dataclasses.dataclass(frozen=True)
class ConstantEvaluator:
    """Returns ``accuracy`` at once. Frozen dataclass: picklable for Ray and hashable by value,
    so a Ray worker's per-process objective cache (keyed by the trial context, which holds the
    evaluator) hits on every trial after the first instead of rebuilding the objective."""

    accuracy: float = 0.5
    name: str = "constant"

    def evaluate(self, spec: Any, *, seed: int, report: Any) -> Evaluation:
        return Evaluation(self.accuracy)


def _recipe(**kw: Any) -> SearchRecipe:
    return SearchRecipe(space="tiny", score="soft", sampler="tpe", **kw)


def optuna_engine(recipe: SearchRecipe, storage: str | None) -> float:
    """Seconds for ``recipe.trials`` trials of the bare OptunaEngine (no run-directory IO)."""
    import optuna

    from aanas.search import _count, _default_target_macs

    space = SearchSpace.from_yaml(recipe.space)
    scorer = recipe.scorer(default_target_macs=_default_target_macs(space, _count))
    objective = Objective(space, ConstantEvaluator(), scorer=scorer, seed=recipe.seed)
    t0 = time.perf_counter()
    engine = OptunaEngine(
        space, objective, recipe, storage=storage or "", study_name=f"bench-{time.time_ns()}"
    )
    if storage is None:
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        engine.study = optuna.create_study(
            sampler=engine.make_sampler(recipe.seed), directions=list(scorer.directions)
        )
    results = engine.run()
    elapsed = time.perf_counter() - t0
    assert sum(r.state == "COMPLETE" for r in results) == recipe.trials, results[:3]
    return elapsed


def full_search(recipe: SearchRecipe, out: Path) -> float:
    t0 = time.perf_counter()
    outcome = run_search(recipe, out=out, progress=False, evaluator=ConstantEvaluator())
    elapsed = time.perf_counter() - t0
    done = sum(r.state == "COMPLETE" for r in outcome.results)
    if done != recipe.trials:
        raise SystemExit(f"{out}: {done} of {recipe.trials} trials complete: {outcome.results}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optuna-trials", type=int, default=50)
    parser.add_argument("--ray-trials", type=int, nargs=2, default=[10, 25], metavar=("N1", "N2"))
    parser.add_argument("--num-cpus", type=int, default=2, help="local Ray CPUs (1 per trial)")
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--quick", action="store_true", help="20 Optuna, 5/12 Ray trials")
    args = parser.parse_args()
    if args.quick:
        args.optuna_trials, args.ray_trials = 20, [5, 12]
    logging.getLogger("aanas").setLevel(logging.ERROR)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    tmp = Path(tempfile.mkdtemp(prefix="aanas-overhead-"))
    n = args.optuna_trials
    rows: list[tuple[str, int, float, float]] = []  # name, trials, total s, s/trial

    def add(name: str, trials: int, seconds: float) -> None:
        rows.append((name, trials, seconds, seconds / trials))
        print(
            f"{name}: {trials} trials in {seconds:.2f}s = {seconds / trials:.4f} s/trial",
            flush=True,
        )

    # warm-up: imports (optuna, sqlalchemy) and the space cache, not counted
    optuna_engine(_recipe(trials=2), None)

    add("optuna-mem (OptunaEngine)", n, optuna_engine(_recipe(trials=n), None))
    add(
        "optuna-sqlite (OptunaEngine)",
        n,
        optuna_engine(_recipe(trials=n), f"sqlite:///{tmp / 'engine.db'}"),
    )
    add("run_search optuna (sqlite + run dir)", n, full_search(_recipe(trials=n), tmp / "optuna"))
    rand = dataclasses.replace(_recipe(trials=n), sampler="random")
    add("optuna-mem random (OptunaEngine)", n, optuna_engine(rand, None))

    ray_init_s = float("nan")
    ray_rows: dict[str, tuple[float, float]] = {}
    if not args.skip_ray:
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        ray_init_s = time.perf_counter() - t0
        print(f"ray.init: {ray_init_s:.2f}s", flush=True)
        n1, n2 = args.ray_trials
        for label, sampler in (("ray optuna-tpe", "tpe"), ("ray random", "random")):
            times = []
            for trials in (n1, n2):
                recipe = _recipe(trials=trials, engine="ray", num_cpus=args.num_cpus)
                recipe = dataclasses.replace(recipe, sampler=sampler)
                seconds = full_search(recipe, tmp / f"{sampler}-{trials}")
                add(f"run_search {label}", trials, seconds)
                times.append(seconds)
            marginal = (times[1] - times[0]) / (n2 - n1)
            ray_rows[label] = (marginal, times[0] - marginal * n1)
        ray.shutdown()

    print()
    print(f"## Engine overhead per trial (trivial evaluator, tiny space), Ray CPUs {args.num_cpus}")
    print()
    print("| configuration | trials | total s | s/trial | vs optuna-mem | vs optuna-sqlite |")
    print("|---|---|---|---|---|---|")
    mem = rows[0][3]
    sql = rows[1][3]
    for name, trials, total, per in rows:
        print(
            f"| {name} | {trials} | {total:.2f} | {per:.4f} | {per / mem:.2f}x | {per / sql:.2f}x |"
        )
    if ray_rows:
        print()
        print(f"ray.init (local, {args.num_cpus} CPUs, once): {ray_init_s:.2f} s")
        print()
        print(
            "| Ray search | marginal s/trial | fixed s per search | marginal / optuna-mem | "
            "marginal / optuna-sqlite | marginal / run_search optuna |"
        )
        print("|---|---|---|---|---|---|")
        full = rows[2][3]
        for label, (marginal, fixed) in ray_rows.items():
            print(
                f"| {label} | {marginal:.4f} | {fixed:.2f} | {marginal / mem:.1f}x | "
                f"{marginal / sql:.1f}x | {marginal / full:.1f}x |"
            )


if __name__ == "__main__":
    main()
