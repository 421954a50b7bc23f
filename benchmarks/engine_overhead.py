"""Per-trial overhead of ``run_search`` (Optuna engine) against plain Optuna on the same storage.

Both sides search the ``tiny`` space with the same sampler and a trivial evaluator (a fixed
accuracy, returned at once), on Optuna's journal file storage (``run_search``'s default), so the
time is the engines' own:

- ``plain optuna``: ``study.optimize`` whose objective suggests the same parameters
  (:func:`aanas.search.adapters.suggest_params`) and returns a constant;
- ``run_search``: the full ``aanas search`` path: claim lock, count and duplicate check per
  trial, decode, analytical cost, the MnasNet reward, result attributes, appends to
  ``trials.jsonl``/``trials.csv``, the incremental Pareto front, and the final summary.

Both runs happen in one process, one after the other, ``--repeat`` times in alternation
(plain, run_search, plain, run_search, ...), and the ratio is taken per pair: the machine is
shared and noisy, so compare the ratio, not absolute times.

    python benchmarks/engine_overhead.py                  # 1000 trials, TPE
    python benchmarks/engine_overhead.py --trials 200 --sampler random
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from aanas.search import Evaluation, SearchRecipe, run_search
from aanas.search.adapters import optuna_sampler, suggest_params
from aanas.search.scoring import Scorer
from aanas.space import SearchSpace


@dataclasses.dataclass(frozen=True)
class ConstantEvaluator:
    """Returns ``accuracy`` at once (picklable, hashable)."""

    accuracy: float = 0.5
    name: str = "constant"

    def evaluate(self, spec: Any, *, seed: int, report: Any) -> Evaluation:
        return Evaluation(self.accuracy)


def plain_optuna(recipe: SearchRecipe, journal: Path) -> float:
    """Seconds for ``recipe.trials`` trials of ``study.optimize`` on a journal file."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    space = SearchSpace.from_yaml(recipe.space)
    storage = JournalStorage(JournalFileBackend(str(journal)))
    sampler = optuna_sampler(recipe, Scorer("accuracy"), workers=2)  # constant liar, as ours
    study = optuna.create_study(storage=storage, sampler=sampler, direction="maximize")
    t0 = time.perf_counter()
    study.optimize(lambda trial: (suggest_params(space, trial), 0.5)[1], n_trials=recipe.trials)
    return time.perf_counter() - t0


def full_search(recipe: SearchRecipe, out: Path) -> tuple[float, int]:
    """Seconds for ``run_search`` and the number of distinct architectures it evaluated."""
    t0 = time.perf_counter()
    outcome = run_search(recipe, out=out, progress=False, evaluator=ConstantEvaluator())
    elapsed = time.perf_counter() - t0
    finished = [r for r in outcome.results if r.state in ("COMPLETE", "REJECTED")]
    if len(finished) != recipe.trials:
        raise SystemExit(f"{out}: {len(finished)} of {recipe.trials} trials finished")
    distinct = len({r.spec for r in outcome.results if "duplicate_of" not in r.metrics})
    return elapsed, distinct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--sampler", default="tpe", choices=["tpe", "random"])
    parser.add_argument("--repeat", type=int, default=1, help="alternating pairs of runs")
    args = parser.parse_args()
    logging.getLogger("aanas").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    tmp = Path(tempfile.mkdtemp(prefix="aanas-overhead-"))
    recipe = SearchRecipe(space="tiny", score="soft", sampler=args.sampler, trials=args.trials)
    # warm-up (imports, space cache), not counted
    plain_optuna(dataclasses.replace(recipe, trials=3), tmp / "warm.journal")
    full_search(dataclasses.replace(recipe, trials=3), tmp / "warm")
    ratios = []
    for k in range(args.repeat):
        plain = plain_optuna(recipe, tmp / f"plain-{k}.journal")
        ours, distinct = full_search(recipe, tmp / f"run-{k}")
        ratios.append(ours / plain)
        print(
            f"pair {k}: plain optuna {plain:.1f} s ({1000 * plain / args.trials:.1f} ms/trial), "
            f"run_search {ours:.1f} s ({1000 * ours / args.trials:.1f} ms/trial, "
            f"{distinct} distinct architectures evaluated), ratio {ours / plain:.2f}x",
            flush=True,
        )
    print()
    print(
        f"## run_search / plain Optuna, {args.trials} trials, {args.sampler}, journal file "
        "storage, trivial evaluator (one run; shared, noisy machine)"
    )
    print()
    print(f"ratio per pair: {', '.join(f'{r:.2f}x' for r in ratios)}; "
          f"median {statistics.median(ratios):.2f}x (goal <= 2x)")  # fmt: skip


if __name__ == "__main__":
    main()
